"""The true Fisher (labels drawn from the model) of an image classifier: ``exact=True`` sums over
the classes, ``C_i = Σ_c p(c|x_i) (∇ CE(x_i, c))²``, against the brute force, float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import vision_models as vm

import hf_fisher


def test_exact_true_fisher_of_a_vit_classifier():
    model = vm.vit()
    batch = vm.image_batch(3, seed=4)
    fisher = hf_fisher.collect(model, [batch], estimator="true", exact=True, accumulation_dtype=torch.float64, progress=False)
    named = [(n, p) for n, p in model.named_parameters()]
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    for i in range(3):
        logits = model(pixel_values=batch["pixel_values"][i : i + 1]).logits
        probs = torch.softmax(logits.detach().double(), -1)[0]
        for c in range(vm.NUM_LABELS):
            grads = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([c])), [p for _, p in named], retain_graph=True)
            for (n, _), g in zip(named, grads):
                want[n] += probs[c] * g.double() ** 2 / 3
    assert fisher.counts.samples == 3
    top = max(float(t.abs().max()) for t in want.values())
    for n in want:
        torch.testing.assert_close(fisher[n].double(), want[n], rtol=1e-6, atol=1e-9 * top, msg=lambda m, n=n: f"{n}: {m}")
