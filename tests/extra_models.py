"""Tiny real models of the architecture families beyond the core set (issue 12), built from configs.

Every factory takes ``dtype`` and returns ``(model, task_type, sides)``: the task the reference
uses ("causal_lm", "masked_lm", "classification") and the padding sides the family supports
(decoders: right and left; encoders: right).
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 61
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
DECODER = dict(SMALL, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENCODER = dict(SMALL, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0)
BOTH = ("right", "left")
RIGHT = ("right",)


def _finish(model, dtype, seed):
    # non-trivial values everywhere (several inits start biases or norms at exact constants)
    torch.manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def roberta_mlm(dtype=torch.float64, seed=20):
    torch.manual_seed(seed)
    cfg = tf.RobertaConfig(**dict(ENCODER, pad_token_id=1, max_position_embeddings=130))
    return _finish(tf.RobertaForMaskedLM(cfg), dtype, seed), "masked_lm", RIGHT


def xlm_roberta_classifier(dtype=torch.float64, seed=21):
    torch.manual_seed(seed)
    cfg = tf.XLMRobertaConfig(**dict(ENCODER, pad_token_id=1, max_position_embeddings=130, num_labels=3))
    return _finish(tf.XLMRobertaForSequenceClassification(cfg), dtype, seed), "classification", RIGHT


def bert_mlm(dtype=torch.float64, seed=22):
    torch.manual_seed(seed)
    return _finish(tf.BertForMaskedLM(tf.BertConfig(**ENCODER)), dtype, seed), "masked_lm", RIGHT


def bert_classifier(dtype=torch.float32, seed=23):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(**dict(ENCODER, num_labels=3))
    return _finish(tf.BertForSequenceClassification(cfg), dtype, seed), "classification", RIGHT


def distilbert_classifier(dtype=torch.float32, seed=24):
    torch.manual_seed(seed)
    cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=40, max_position_embeddings=128, pad_token_id=0, num_labels=3)
    return _finish(tf.DistilBertForSequenceClassification(cfg), dtype, seed), "classification", RIGHT


def electra_classifier(dtype=torch.float32, seed=25):
    torch.manual_seed(seed)
    cfg = tf.ElectraConfig(**dict(ENCODER, embedding_size=16, num_labels=3))
    return _finish(tf.ElectraForSequenceClassification(cfg), dtype, seed), "classification", RIGHT


def albert_classifier(dtype=torch.float32, seed=26):
    torch.manual_seed(seed)
    cfg = tf.AlbertConfig(**dict(ENCODER, embedding_size=16, num_labels=3))
    return _finish(tf.AlbertForSequenceClassification(cfg), dtype, seed), "classification", RIGHT


def cohere(dtype=torch.float64, seed=27):
    torch.manual_seed(seed)
    cfg = tf.CohereConfig(**dict(DECODER, num_key_value_heads=2))
    return _finish(tf.CohereForCausalLM(cfg), dtype, seed), "causal_lm", BOTH


def deberta_v2_classifier(dtype=torch.float64, seed=28):
    torch.manual_seed(seed)
    cfg = tf.DebertaV2Config(
        **dict(ENCODER, num_labels=3), relative_attention=True, position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
    )
    return _finish(tf.DebertaV2ForSequenceClassification(cfg), dtype, seed), "classification", RIGHT


def deberta_v3_classifier(dtype=torch.float64, seed=38):
    """DeBERTa-v3 style: the relative-position embeddings go through the encoder LayerNorm
    (``norm_rel_ebd="layer_norm"``) and through the content ``query_proj``/``key_proj``
    (``share_att_key=True``), so those projections have a per-sample call and a batch-shared one."""
    torch.manual_seed(seed)
    cfg = tf.DebertaV2Config(
        **dict(ENCODER, num_labels=3), relative_attention=True, position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0, share_att_key=True,
        norm_rel_ebd="layer_norm",
    )
    return _finish(tf.DebertaV2ForSequenceClassification(cfg), dtype, seed), "classification", RIGHT


def modernbert_mlm(dtype=torch.float64, seed=29):
    torch.manual_seed(seed)
    cfg = tf.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        global_attn_every_n_layers=2, local_attention=4, attn_implementation="eager",
    )
    return _finish(tf.ModernBertForMaskedLM(cfg), dtype, seed), "masked_lm", RIGHT


def gemma(dtype=torch.float64, seed=30):
    torch.manual_seed(seed)
    cfg = tf.GemmaConfig(**dict(DECODER, num_key_value_heads=2, head_dim=8))
    return _finish(tf.GemmaForCausalLM(cfg), dtype, seed), "causal_lm", BOTH


def gemma2(dtype=torch.float64, seed=31, sliding_window=64):
    torch.manual_seed(seed)
    cfg = tf.Gemma2Config(**dict(DECODER, num_key_value_heads=2, head_dim=8), sliding_window=sliding_window, attn_implementation="eager")
    return _finish(tf.Gemma2ForCausalLM(cfg), dtype, seed), "causal_lm", BOTH


def gemma3(dtype=torch.float64, seed=32):
    torch.manual_seed(seed)
    cfg = tf.Gemma3TextConfig(**dict(DECODER, num_key_value_heads=2, head_dim=8), sliding_window=64, attn_implementation="eager")
    return _finish(tf.Gemma3ForCausalLM(cfg), dtype, seed), "causal_lm", BOTH


def opt(dtype=torch.float64, seed=33):
    torch.manual_seed(seed)
    cfg = tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=40,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return _finish(tf.OPTForCausalLM(cfg), dtype, seed), "causal_lm", BOTH


def _eager_experts(model):
    # the default grouped_mm experts kernel rejects float64; the float64 reference needs eager
    model.set_experts_implementation("eager")
    return model


def mixtral(dtype=torch.float64, seed=34):
    torch.manual_seed(seed)
    cfg = tf.MixtralConfig(**dict(DECODER, num_key_value_heads=2), num_local_experts=4, num_experts_per_tok=2)
    return _eager_experts(_finish(tf.MixtralForCausalLM(cfg), dtype, seed)), "causal_lm", BOTH


def qwen2_moe(dtype=torch.float64, seed=35):
    torch.manual_seed(seed)
    cfg = tf.Qwen2MoeConfig(
        **dict(DECODER, num_key_value_heads=2), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, decoder_sparse_step=1,
    )
    return _eager_experts(_finish(tf.Qwen2MoeForCausalLM(cfg), dtype, seed)), "causal_lm", BOTH


def qwen3_moe(dtype=torch.float64, seed=36):
    torch.manual_seed(seed)
    cfg = tf.Qwen3MoeConfig(
        **dict(DECODER, num_key_value_heads=2, head_dim=8), num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, decoder_sparse_step=1, norm_topk_prob=True,
    )
    return _eager_experts(_finish(tf.Qwen3MoeForCausalLM(cfg), dtype, seed)), "causal_lm", BOTH


ZOO = {
    "roberta_mlm": roberta_mlm,
    "xlm_roberta_cls": xlm_roberta_classifier,
    "bert_mlm": bert_mlm,
    "bert_cls_f32": bert_classifier,
    "distilbert_cls_f32": distilbert_classifier,
    "electra_cls_f32": electra_classifier,
    "albert_cls_f32": albert_classifier,
    "cohere": cohere,
    "deberta_v2_cls": deberta_v2_classifier,
    "modernbert_mlm": modernbert_mlm,
    "gemma": gemma,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "opt": opt,
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
}
