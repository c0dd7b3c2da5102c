"""Integrations of the fused adversarial-training classes with training frameworks.

``fused_adv.integrations.hf``: Hugging Face ``Trainer`` mixin (``AdversarialTrainerMixin``) and
``make_adversarial(trainer, "awp", ...)`` (docs/hf.md).  Imported lazily: ``import fused_adv``
never needs transformers.
"""
