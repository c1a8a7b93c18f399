"""Tiny real transformers models built from configs (no download), shared by the test suite.

Every factory takes ``dtype`` and returns a model in eval mode with a fixed seed.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 61


def _finish(model, dtype):
    model = model.to(dtype)
    model.eval()
    return model


def llama(dtype=torch.float64, *, kv_heads=2, layers=2, seed=0, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return _finish(tf.LlamaForCausalLM(cfg), dtype)


def mistral(dtype=torch.float64, *, seed=1):
    torch.manual_seed(seed)
    cfg = tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=None, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return _finish(tf.MistralForCausalLM(cfg), dtype)


def qwen2(dtype=torch.float64, *, seed=2):
    torch.manual_seed(seed)
    cfg = tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return _finish(tf.Qwen2ForCausalLM(cfg), dtype)


def qwen3(dtype=torch.float64, *, seed=3, kv_heads=1):
    torch.manual_seed(seed)
    cfg = tf.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return _finish(tf.Qwen3ForCausalLM(cfg), dtype)


def gpt2(dtype=torch.float64, *, seed=4):
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _finish(tf.GPT2LMHeadModel(cfg), dtype)


def gpt_bigcode(dtype=torch.float64, *, seed=5):
    torch.manual_seed(seed)
    cfg = tf.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, multi_query=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _finish(tf.GPTBigCodeForCausalLM(cfg), dtype)


def lora_llama(dtype=torch.float64, *, seed=6):
    import peft

    base = llama(dtype, seed=seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    # LoRA B starts at zero; give it values so every gradient is non-trivial.
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    return model


def bert_classifier(dtype=torch.float64, *, seed=7, num_labels=3):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=40, max_position_embeddings=128, num_labels=num_labels, pad_token_id=0,
    )
    return _finish(tf.BertForSequenceClassification(cfg), dtype)


def bert_mlm(dtype=torch.float64, *, seed=8):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=40, max_position_embeddings=128, pad_token_id=0,
    )
    return _finish(tf.BertForMaskedLM(cfg), dtype)


CAUSAL_LMS = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gpt2": gpt2,
    "gpt_bigcode": gpt_bigcode,
    "lora_llama": lora_llama,
}


def padded_batch(lengths, *, seed=0, vocab=VOCAB, pad_id=0, ignore_some=True, side="right"):
    """A padded causal-LM batch of the given sequence lengths, with some -100 labels.

    Returns a dict with input_ids, attention_mask, labels (padding labelled -100).
    """
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    labels = torch.full((len(lengths), T), -100, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq = torch.randint(3, vocab, (n,), generator=g)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = seq
        mask[i, sl] = 1
        lab = seq.clone()
        if ignore_some and n > 3:
            lab[1] = -100  # an ignored label token inside the sequence
        labels[i, sl] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ListDataset(torch.utils.data.Dataset):
    """A list of samples as a map-style dataset (what the Trainer tests feed a Trainer)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]
