"""Mamba2 and FalconMamba against the brute force, batched (padded, both sides).

Both models compute parts of their mixer in float32 whatever the model's dtype (Mamba2's scan
casts ``hidden_states``, ``B``, ``C``, ``dt`` and ``A`` with ``.float()``; FalconMamba its
``A = -exp(A_log.float())``), so a float64 model is exact only to float32's rounding: the
brute force, run one sample at a time on the same weights, rounds differently than a padded
batch. They are therefore checked with the float32 tolerances of tests/test_architectures.py
(in float64 the largest relative difference measured is 5e-6, on a handful of small entries)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_architectures import ATOL_REL_F32, RTOL_F32, make_batches, path_of, samples_of

import hf_fisher

import reference as R
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def mamba2(seed=41):
    torch.manual_seed(seed)
    cfg = tf.Mamba2Config(
        vocab_size=tm.VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, num_heads=8,
        head_dim=8, n_groups=1, time_step_rank=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, chunk_size=8,
    )
    return tf.Mamba2ForCausalLM(cfg).to(torch.float64).eval()


def falcon_mamba(seed=42):
    torch.manual_seed(seed)
    cfg = tf.FalconMambaConfig(
        vocab_size=tm.VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        time_step_rank=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.FalconMambaForCausalLM(cfg).to(torch.float64).eval()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("build", [mamba2, falcon_mamba], ids=["mamba2", "falcon_mamba"])
def test_state_space_models_exact_to_their_float32_internals(build, side):
    model = build()
    batches = make_batches(model, "causal_lm", side)
    samples = samples_of(batches)
    fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    mean, var, n_used, _ = R.reference_fisher(model, samples, task_type="causal_lm")
    assert sorted(fisher.names()) == sorted(mean) and fisher.counts.samples == n_used == len(samples)
    assert fisher.counts.tokens == sum(R.label_tokens(s, "causal_lm") for s in samples)
    floor_m, floor_v = R.global_floor(mean), R.global_floor(var)
    for name in mean:
        R.assert_close(fisher[name], mean[name], rtol=RTOL_F32, atol_rel=ATOL_REL_F32, floor=floor_m, what=f"mean {name}")
        R.assert_close(fisher.variances[name], var[name], rtol=RTOL_F32, atol_rel=ATOL_REL_F32, floor=floor_v,
                       what=f"variance {name}")
    # the conv1d (and FalconMamba's dt_proj) weights are used outside their modules' forwards: the vjp path
    assert path_of(fisher) == "batched"
    assert "backbone.layers.0.mixer.conv1d.weight" in set(fisher.metadata.extra.get("vjp_params") or {})
