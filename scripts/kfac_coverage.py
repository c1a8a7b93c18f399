"""Which Linear / Conv1D weights KFAC leaves uncovered, per architecture (tiny random models).

    PYTHONPATH=. python scripts/kfac_coverage.py [model_type ...]

Builds each architecture from a tiny config (no download), collects KFAC on one right-padded
batch and prints, per architecture, the nn.Linear / HF Conv1D layers the artifact does not
cover (``KFACFisher.uncovered`` gives the reason) or the error the collection raised.
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
}


def build(name: str) -> nn.Module:
    options = dict(CONFIGS[name])
    model_type = options.pop("model_type", name)
    cfg = tf.AutoConfig.for_model(model_type, **{**COMMON, **options})
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def report(name: str) -> tuple[int, list[str], str]:
    model = build(name)
    conv1d = conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    linear = [m for m, mod in model.named_modules() if isinstance(mod, kinds)]
    try:
        k = KFACEstimator().collect(model, [batch()], progress=False)
    except Exception as e:  # noqa: BLE001 - a report
        return len(linear), linear, f"{type(e).__name__}: {e}"
    return len(linear), [n for n in linear if n not in k.layers], ""


def main(names: list[str]) -> None:
    logging.basicConfig(level=logging.ERROR)
    print(f"| architecture | Linear/Conv1D layers | uncovered | note |\n|---|---|---|---|")
    for name in names or list(CONFIGS):
        try:
            total, left, err = report(name)
        except Exception as e:  # noqa: BLE001 - the config itself failed
            print(f"| {name} | - | - | could not build: {type(e).__name__}: {str(e)[:80]} |")
            continue
        shown = ", ".join(left[:3]) + (f" (+{len(left) - 3})" if len(left) > 3 else "")
        print(f"| {name} | {total} | {len(left)} {shown} | {err[:140]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
