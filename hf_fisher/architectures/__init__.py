"""Built-in architecture adapters (plugins implementing ``hf_fisher_model_layout``).

- :mod:`~hf_fisher.architectures.llama`: llama, mistral, qwen2, qwen3 (dense, GQA/MQA).
- :mod:`~hf_fisher.architectures.gpt2`: GPT-2 (fused ``Conv1D`` c_attn) and GPTBigCode.
- :mod:`~hf_fisher.architectures.generic`: fallback for any model (``trylast``).

Third-party adapters build layouts with :class:`LayoutBuilder` and :class:`HeadPart`.
The adapter modules themselves are imported by :mod:`hf_fisher.plugins`, not here.
"""

from __future__ import annotations

from hf_fisher.architectures.builder import HeadPart, LayoutBuilder

__all__ = ["HeadPart", "LayoutBuilder"]
