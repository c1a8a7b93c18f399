"""Tiny real image and audio classifiers built from configs, their batches, and a brute-force
per-sample reference for them (one sample at a time, without its padding, plain autograd,
float64), sharing no code with the engine.

Every factory takes ``dtype`` and returns a model in eval mode with non-trivial biases and norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers as tf

from extra_models import _finish  # non-trivial biases and norms, as for the text models

NUM_LABELS = 3
ATTN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)


def vit(dtype=torch.float64, seed=40):
    torch.manual_seed(seed)
    cfg = tf.ViTConfig(**ATTN, image_size=16, patch_size=4, num_channels=3, num_labels=NUM_LABELS)
    return _finish(tf.ViTForImageClassification(cfg), dtype, seed)


def deit(dtype=torch.float64, seed=41):
    torch.manual_seed(seed)
    cfg = tf.DeiTConfig(**ATTN, image_size=16, patch_size=4, num_channels=3, num_labels=NUM_LABELS)
    return _finish(tf.DeiTForImageClassification(cfg), dtype, seed)


def convnext(dtype=torch.float64, seed=42):
    torch.manual_seed(seed)
    cfg = tf.ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS, image_size=16)
    return _finish(tf.ConvNextForImageClassification(cfg), dtype, seed)


def swin(dtype=torch.float64, seed=43):
    torch.manual_seed(seed)
    cfg = tf.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                        window_size=2, mlp_ratio=2.0, num_labels=NUM_LABELS)
    return _finish(tf.SwinForImageClassification(cfg), dtype, seed)


def clip_vision(dtype=torch.float64, seed=44):
    torch.manual_seed(seed)
    vision = dict(ATTN, image_size=16, patch_size=4, num_channels=3, projection_dim=16)
    text = dict(ATTN, vocab_size=50, max_position_embeddings=16, projection_dim=16)
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, num_labels=NUM_LABELS)
    return _finish(tf.CLIPForImageClassification(cfg), dtype, seed)


AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
             conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=8,
             num_conv_pos_embedding_groups=4, mask_time_prob=0.0, mask_feature_prob=0.0,
             classifier_proj_size=16, num_labels=NUM_LABELS, vocab_size=10)


def wav2vec2(dtype=torch.float64, seed=45, norm="layer"):
    """``norm="layer"``: the variant that takes an attention mask; ``"group"`` mixes the padding in."""
    torch.manual_seed(seed)
    cfg = tf.Wav2Vec2Config(**AUDIO, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer")
    return _finish(tf.Wav2Vec2ForSequenceClassification(cfg), dtype, seed)


def hubert(dtype=torch.float64, seed=46):
    torch.manual_seed(seed)
    cfg = tf.HubertConfig(**AUDIO, feat_extract_norm="layer", do_stable_layer_norm=True)
    return _finish(tf.HubertForSequenceClassification(cfg), dtype, seed)


IMAGE_MODELS = {"vit": vit, "deit": deit, "convnext": convnext, "swin": swin, "clip": clip_vision}
AUDIO_MODELS = {"wav2vec2": wav2vec2, "hubert": hubert}


def image_batch(n: int, *, dtype=torch.float64, seed=0, size=16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(n, 3, size, size, generator=g, dtype=torch.float64).to(dtype),
        "labels": torch.randint(0, NUM_LABELS, (n,), generator=g),
    }


def audio_batch(lengths: list[int], *, dtype=torch.float64, seed=0) -> dict[str, torch.Tensor]:
    """Right-padded raw audio (zeros past each length) with its attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    x = torch.zeros(len(lengths), T, dtype=torch.float64)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, generator=g, dtype=torch.float64)
        mask[i, :n] = 1
    return {"input_values": x.to(dtype), "attention_mask": mask, "labels": torch.randint(0, NUM_LABELS, (len(lengths),), generator=g)}


def samples(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each sample alone, without its padding (audio: its ``attention_mask == 1`` samples, no mask)."""
    out = []
    B = batch["labels"].shape[0]
    for i in range(B):
        if "pixel_values" in batch:
            out.append({"pixel_values": batch["pixel_values"][i : i + 1], "labels": batch["labels"][i : i + 1]})
        else:
            n = int(batch["attention_mask"][i].sum())
            out.append({"input_values": batch["input_values"][i : i + 1, :n], "labels": batch["labels"][i : i + 1]})
    return out


def reference(model, batches, *, groups=None):
    """``(mean, variance, n)`` of ``C_i = g_i ⊙ g_i``, ``g_i = d CE(model(x_i), y_i)/dθ`` (float64;
    with ``groups``: of ``groups[name].reduce(C_i)``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for b in batches:
        for s in samples(b):
            labels = s.pop("labels")
            logits = model(**s).logits
            loss = F.cross_entropy(logits.double(), labels)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            c = {}
            for (n, p), g in zip(named, grads):
                g = torch.zeros_like(p, dtype=torch.float64) if g is None else g.double()
                c[n] = groups[n].reduce(g * g) if groups is not None else g * g
            rows.append(c)
    mean = {n: torch.stack([r[n] for r in rows]).mean(0) for n in rows[0]}
    var = {n: torch.stack([r[n] for r in rows]).var(0, unbiased=True) for n in rows[0]}
    return mean, var, len(rows)


def assert_matches(fisher, mean, var, n, *, rtol=1e-6):
    """Every parameter's mean and variance equal the reference (``atol`` 1e-9 of the model's largest)."""
    assert fisher.counts.samples == n
    assert sorted(fisher.names()) == sorted(mean)
    top_m = max(float(t.abs().max()) for t in mean.values())
    top_v = max(float(t.abs().max()) for t in var.values())
    for name in mean:
        torch.testing.assert_close(fisher[name].double(), mean[name], rtol=rtol, atol=1e-9 * top_m, msg=lambda m, n=name: f"mean {n}: {m}")
        torch.testing.assert_close(fisher.variances[name].double(), var[name], rtol=rtol, atol=1e-9 * top_v, msg=lambda m, n=name: f"variance {n}: {m}")
