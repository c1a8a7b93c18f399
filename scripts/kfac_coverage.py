"""Which Linear / Conv1D weights KFAC leaves uncovered, per architecture (tiny random models).

    PYTHONPATH=. python scripts/kfac_coverage.py [model_type ...]

Builds each architecture from a tiny config (no download), collects KFAC on one right-padded
batch and prints, per architecture, the nn.Linear / HF Conv1D layers the artifact does not
cover, the other parameters it leaves out (by module type; ``KFACFisher.uncovered`` gives the
reasons) or the error the collection raised.
"""

from __future__ import annotations

import logging
import sys

import torch
import transformers as tf
from torch import nn

from hf_fisher.engine.rules import conv1d_type
from hf_fisher.estimators.kfac import KFACEstimator

V = 61
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "falcon": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False),
    "falcon-mha": dict(model_type="falcon", new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True),
    "falcon-new": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2),
    "falcon-alibi": dict(model_type="falcon", new_decoder_architecture=False, multi_query=False, alibi=True, bias=True),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": dict(num_key_value_heads=2),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "gpt_neox": dict(rotary_pct=0.5),
    "stablelm": dict(num_key_value_heads=2),
    "olmo": dict(num_key_value_heads=2),
    "olmo2": dict(num_key_value_heads=2),
    "granite": dict(num_key_value_heads=2),
    "starcoder2": dict(num_key_value_heads=2),
    "glm": dict(num_key_value_heads=2, head_dim=8),
    "glm4": dict(num_key_value_heads=2, head_dim=8),
    "nemotron": dict(num_key_value_heads=2, head_dim=8),
    "bloom": dict(n_layer=2, n_head=4),
    "mpt": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, expansion_ratio=2),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64, rotary_dim=4),
    "qwen2": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": dict(num_key_value_heads=2),
    "smollm3": dict(num_key_value_heads=2),
    "olmo3": dict(num_key_value_heads=2),
    "olmoe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, v_head_dim=8,
                        qk_nope_head_dim=4, n_group=1, topk_group=1),
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, v_head_dim=8,
                        qk_nope_head_dim=4, n_group=1, topk_group=1),
    "jamba": dict(num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, mamba_d_state=4, mamba_expand=2,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  use_mamba_kernels=False),
}

#: the architectures issue 21 lists for KFAC (every Linear / Conv1D layer must be covered)
LISTED = ["falcon", "falcon-mha", "falcon-new", "falcon-alibi", "phi", "phi3", "gptj", "gpt_neox", "stablelm", "olmo",
          "olmo2", "granite", "starcoder2", "glm", "glm4", "nemotron", "bloom", "mpt", "codegen", "qwen2", "mistral",
          "gpt2", "llama", "smollm3", "olmo3", "deepseek_v2", "deepseek_v3"]


def build(name: str) -> nn.Module:
    options = dict(CONFIGS[name])
    model_type = options.pop("model_type", name)
    cfg = tf.AutoConfig.for_model(model_type, **{**COMMON, **options})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()
    if hasattr(model, "set_experts_implementation") and any("expert" in n for n, _ in model.named_modules()):
        model.set_experts_implementation("eager")  # the grouped_mm kernel rejects float64
    return model


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def report(name: str) -> tuple[int, list[str], str, str]:
    """(Linear / Conv1D layers, those left out, the collection's error, the other parameters left out)."""
    model = build(name)
    conv1d = conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    linear = [m for m, mod in model.named_modules() if isinstance(mod, kinds)]
    try:
        k = KFACEstimator().collect(model, [batch()], progress=False)
    except Exception as e:
        return len(linear), linear, f"{type(e).__name__}: {e}", ""
    owner = {id(p): type(m).__name__ for m in model.modules() for p in m._parameters.values() if p is not None}
    params = dict(model.named_parameters())
    other: dict[str, int] = {}
    for n in k.uncovered:
        t = owner.get(id(params[n]), "?")
        other[t] = other.get(t, 0) + 1
    note = ", ".join(f"{c} in {t}" for t, c in sorted(other.items()))
    return len(linear), [n for n in linear if n not in k.layers], "", note


def main(names: list[str]) -> None:
    logging.basicConfig(level=logging.ERROR)
    print("| architecture | Linear/Conv1D layers | left out | other parameters left out | error |\n|---|---|---|---|---|")
    for name in names or list(CONFIGS):
        try:
            total, left, err, other = report(name)
        except Exception as e:
            print(f"| {name} | - | - | - | could not build: {type(e).__name__}: {str(e)[:80]} |")
            continue
        shown = ", ".join(left[:3]) + (f" (+{len(left) - 3})" if len(left) > 3 else "")
        print(f"| {name} | {total} | {len(left)} {shown} | {other} | {err[:160]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
