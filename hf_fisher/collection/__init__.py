"""Collection: from a model and data to accumulated per-sample statistics.

- :mod:`.collector` -- :class:`FisherCollector`, the empirical diagonal Fisher over batches and tasks;
- :mod:`.stats` -- Welford/Chan moments and the bias-corrected EMA (pure tensor math);
- :mod:`.distributed` -- exact merging of those statistics across ``torch.distributed`` ranks;
- :mod:`.gradients` -- per-sample gradients kept on disk (:class:`GradientStore`);
- :mod:`.activations` -- module inputs (token activations) captured over calibration data.

The estimators (:mod:`hf_fisher.estimators`) drive the collector; consumers call the public
entry point :func:`hf_fisher.collect` or read these modules' public classes.

The entry point stays the function :func:`hf_fisher.collect` (:mod:`hf_fisher.api`); this package is
named ``collection`` so that it never shadows that function.
"""

