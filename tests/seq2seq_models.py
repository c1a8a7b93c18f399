"""Tiny real encoder-decoder models built from configs (no download) and a brute-force
per-sample reference for them, shared by tests/test_seq2seq_*.py.

The reference runs every sample alone, without its padding (source trimmed to its attention
mask, target to its last label token), through the model's OWN loss (``model(..., labels=)``:
the model shifts the labels itself), in float64 with plain autograd: independent of
hf_fisher.engine.seq2seq.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 61


def _finish(model, dtype):
    model = model.to(dtype)
    model.eval()
    return model


def t5(dtype=torch.float64, *, seed=0):
    torch.manual_seed(seed)
    cfg = tf.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, dropout_rate=0.0,
    )
    return _finish(tf.T5ForConditionalGeneration(cfg), dtype)


def _bart_like(cls, cfg_cls, seed, dtype, **kw):
    torch.manual_seed(seed)
    cfg = cfg_cls(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **kw,
    )
    return _finish(cls(cfg), dtype)


def bart(dtype=torch.float64, *, seed=1):
    return _bart_like(tf.BartForConditionalGeneration, tf.BartConfig, seed, dtype,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def marian(dtype=torch.float64, *, seed=2):
    return _bart_like(tf.MarianMTModel, tf.MarianConfig, seed, dtype,
                      pad_token_id=60, eos_token_id=0, decoder_start_token_id=60)


def mbart(dtype=torch.float64, *, seed=3):
    return _bart_like(tf.MBartForConditionalGeneration, tf.MBartConfig, seed, dtype,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def pegasus(dtype=torch.float64, *, seed=5):
    return _bart_like(tf.PegasusForConditionalGeneration, tf.PegasusConfig, seed, dtype,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def whisper(dtype=torch.float64, *, seed=4):
    torch.manual_seed(seed)
    cfg = tf.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_source_positions=6,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    return _finish(tf.WhisperForConditionalGeneration(cfg), dtype)


TOKEN_MODELS = {"t5": t5, "bart": bart, "marian": marian, "mbart": mbart, "pegasus": pegasus}


def batch(model, src_lens, tgt_lens, *, side="right", seed=0, decoder_mask=False, pad_extra=1):
    """A padded seq2seq batch: sources ``side``-padded (attention_mask 0), targets right-padded
    with -100 (and a decoder_attention_mask when asked); ``input_features`` for Whisper."""
    g = torch.Generator().manual_seed(seed)
    B = len(tgt_lens)
    pad = model.config.pad_token_id
    L = max(tgt_lens) + pad_extra
    labels = torch.full((B, L), -100, dtype=torch.long)
    dmask = torch.zeros((B, L), dtype=torch.long)
    for i, n in enumerate(tgt_lens):
        labels[i, :n] = torch.randint(3, VOCAB - 1, (n,), generator=g)
        dmask[i, :n] = 1
    out = {"labels": labels}
    if decoder_mask:
        out["decoder_attention_mask"] = dmask
    if model.main_input_name == "input_features":
        cfg = model.config
        out["input_features"] = torch.randn(B, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g, dtype=torch.float64).to(model.dtype)
        return out
    S = max(src_lens) + pad_extra
    ids = torch.full((B, S), pad, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    for i, n in enumerate(src_lens):
        sl = slice(0, n) if side == "right" else slice(S - n, S)
        ids[i, sl] = torch.randint(3, VOCAB - 1, (n,), generator=g)
        mask[i, sl] = 1
    out.update(input_ids=ids, attention_mask=mask)
    return out


def samples(b):
    """Each sample of a batch alone, without padding (source by its mask, target by its last label)."""
    out = []
    labels = b["labels"]
    for i in range(labels.shape[0]):
        valid = (labels[i] != -100).nonzero().flatten()
        n = int(valid[-1]) + 1 if valid.numel() else 0
        s = {"labels": labels[i : i + 1, :n]}
        if "input_features" in b:
            s["input_features"] = b["input_features"][i : i + 1]
        else:
            keep = b["attention_mask"][i].bool()
            s["input_ids"] = b["input_ids"][i : i + 1, keep]
        out.append(s)
    return out


def reference(model, batches, normalization="mean"):
    """``(mean, variance, n_used)`` of C_i = g_i² over every sample with a label token, where
    g_i is the gradient of the model's own mean loss over its labels (normalization "mean") or of
    that times n_i ("sum")."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    cs = []
    for b in batches:
        for s in samples(b):
            n = int((s["labels"] != -100).sum())
            if n == 0:
                continue
            loss = model(**s, use_cache=False).loss
            if normalization == "sum":
                loss = loss * n
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            cs.append({name: (torch.zeros_like(p) if g is None else g).double() ** 2 for (name, p), g in zip(named, grads)})
    mean = {k: torch.stack([c[k] for c in cs]).mean(0) for k in cs[0]}
    var = {k: torch.stack([c[k] for c in cs]).var(0, unbiased=True) for k in cs[0]}
    return mean, var, len(cs)
