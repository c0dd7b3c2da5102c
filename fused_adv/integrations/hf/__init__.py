"""Hugging Face ``Trainer`` integration: adversarial training with the fused classes in three lines.

::

    from fused_adv.integrations.hf import AdversarialTrainerMixin

    class AWPTrainer(AdversarialTrainerMixin, Trainer):     # or (Mixin, SFTTrainer), ...
        pass

    trainer = AWPTrainer(model=model, args=args, train_dataset=ds,
                         adversarial="awp", adversarial_kwargs={"adv_lr": 1e-3, "adv_eps": 1e-2})

or, for a trainer that already exists (any ``Trainer`` subclass, e.g. TRL's)::

    from fused_adv.integrations.hf import make_adversarial
    make_adversarial(trainer, "fgm", epsilon=0.5)            # swaps in a dynamic subclass

``adversarial`` is one of ``METHODS``: ``"fgm" | "fgsm" | "pgd" | "awp"`` (weight space) or
``"freelb" | "smart" | "sift"`` (activation space).  What each method's step does, the gradient
accumulation rules, fp16/GradScaler, DDP ``no_sync``, the logged losses, frozen and tied embeddings,
every option name, and how to add a method: docs/hf.md.

Layout: ``config`` (options and their checks), ``embeddings`` (which weight or module is
perturbed), ``passes`` (the Trainer steps a micro-batch is made of), ``trainer`` (the mixin and
``make_adversarial``), ``adv_loss`` (the logged ``adv_loss``), ``strategies/`` (one file per
method, and the registry).  Importing this package does not import transformers.
"""
from __future__ import annotations

from .config import METHODS, AdversarialConfig
from .trainer import AdversarialTrainerMixin, make_adversarial

__all__ = ["AdversarialTrainerMixin", "AdversarialConfig", "make_adversarial", "METHODS"]
