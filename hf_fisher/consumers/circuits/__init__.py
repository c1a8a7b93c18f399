"""Consumers about attention circuits, from exact per-sample gradients and attention patterns.

- :mod:`~hf_fisher.consumers.circuits.qkov`: QK-OV interference of two tasks per head and
  Q/K/V/O block (consumer ``"qkov_interference"``);
- :mod:`~hf_fisher.consumers.circuits.conflicts`: sample pairs of two tasks whose gradients
  conflict, with a Benjamini–Hochberg test (consumer ``"sample_conflicts"``; its defaults in the
  torch-free :mod:`~hf_fisher.consumers.circuits.conflict_defaults`);
- :mod:`~hf_fisher.consumers.circuits.head_behaviour`: a behavioural category per attention head
  and tables aggregated by category (consumers ``"head_categories"``, ``"aggregate_by_category"``).

Each module registers its consumers through ``hf_fisher_register_consumers`` (built-in plugins
listed in :data:`hf_fisher.plugins.BUILTIN_PLUGINS`). This ``__init__`` imports nothing, so the
CLI can read the defaults without importing torch.
"""
