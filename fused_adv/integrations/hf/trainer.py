"""``AdversarialTrainerMixin`` and ``make_adversarial``: the configuration, the strategy built at the
first adversarial step, and the Trainer hooks (``training_step``, ``log``) (docs/hf.md)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .adv_loss import AdvLossMeter
from .config import AdversarialConfig
from .passes import Passes, trainer_step_takes_num_items
from .strategies import STRATEGIES, Strategy

_UNSET = object()


class AdversarialTrainerMixin:
    """Mixin for ``transformers.Trainer`` (and subclasses such as TRL's trainers) that adds FGM,
    FGSM, PGD, AWP, FreeLB, SMART or SiFT to every training step, with the fused classes.  Put it
    FIRST in the bases::

        class MyTrainer(AdversarialTrainerMixin, Trainer): ...
        MyTrainer(..., adversarial="pgd", adversarial_kwargs={"epsilon": 1.0, "alpha": 0.3, "K": 3})

    Constructor keywords (everything else goes to the Trainer): ``adversarial`` (``None`` = plain
    Trainer), ``adversarial_kwargs`` (method arguments + integration options ``backend``,
    ``start_step``, ``start_epoch``; fgm/fgsm/pgd/awp: ``perturb_from``, ``clean_pass_no_sync``;
    fgm/fgsm/pgd: ``tied_embeddings``, ``frozen_embeddings``; pgd: ``K``), ``adversarial_backend``
    ("auto" | "cuda" | "triton" | "cpp" | "torch").  The same names work as class attributes.
    ``configure_adversarial(...)`` changes them later.  Raises what ``AdversarialConfig.build``
    raises, before the Trainer is initialised.  Semantics: docs/hf.md.
    """

    adversarial: str | None = None
    adversarial_kwargs: dict | None = None
    adversarial_backend: str | None = None
    adversarial_pass_uses_super: bool = False

    def __init__(self, *args, adversarial=_UNSET, adversarial_kwargs=_UNSET, adversarial_backend=_UNSET,
                 **kwargs):
        method = type(self).adversarial if adversarial is _UNSET else adversarial
        akw = dict((type(self).adversarial_kwargs if adversarial_kwargs is _UNSET else adversarial_kwargs) or {})
        backend = type(self).adversarial_backend if adversarial_backend is _UNSET else adversarial_backend
        if backend is not None:
            akw["backend"] = backend
        cfg = AdversarialConfig.build(method, akw)  # fail before the (expensive) Trainer init
        super().__init__(*args, **kwargs)
        self._adv_apply(cfg)

    # -- configuration ---------------------------------------------------------------------------
    def configure_adversarial(self, adversarial: str | None, **adversarial_kwargs) -> "AdversarialTrainerMixin":
        """(Re)configure: ``trainer.configure_adversarial("awp", adv_lr=1e-3, perturb_from=...)``.
        ``None`` turns adversarial training off.  The current attacker is released (SiFT's hooks
        removed) and a new one is built at the next step.  Returns the trainer."""
        self._adv_apply(AdversarialConfig.build(adversarial, adversarial_kwargs))
        return self

    def _adv_apply(self, cfg: AdversarialConfig) -> None:
        self._adv_release()
        self._adv_cfg = cfg
        self._adv_meter = AdvLossMeter()
        self.adversarial = cfg.method
        self.adversarial_kwargs = dict(cfg.method_kwargs)
        self.adversarial_backend = cfg.backend

    def _adv_release(self) -> None:
        old = self.__dict__.get("_adv_strategy")
        self._adv_strategy = None
        if old is not None:
            old.release()

    def _adv_config(self) -> AdversarialConfig:
        cfg = self.__dict__.get("_adv_cfg")
        if cfg is None:  # e.g. __init__ bypassed: build from the class attributes
            akw = dict(type(self).adversarial_kwargs or {})
            if type(self).adversarial_backend is not None:
                akw["backend"] = type(self).adversarial_backend
            self._adv_apply(AdversarialConfig.build(type(self).adversarial, akw))
            cfg = self._adv_cfg
        return cfg

    @property
    def adversary(self):
        """The fused attacker (``fused_adv.FGM`` / ``FGSM`` / ``PGD`` / ``AWP`` / ``FreeLB`` /
        ``SMART``, or SiFT's ``AdversarialLearner``), once built at the first adversarial step (else None)."""
        strategy = self.__dict__.get("_adv_strategy")
        return None if strategy is None else strategy.attacker

    def _adversarial_active(self, cfg: AdversarialConfig) -> bool:
        state = self.state
        if (state.global_step or 0) < cfg.start_step or (state.epoch or 0.0) < cfg.start_epoch:
            return False
        return STRATEGIES[cfg.method].active(cfg)

    # -- building the strategy -------------------------------------------------------------------
    def _adv_check_supported(self) -> None:
        reasons = []
        if getattr(self, "is_deepspeed_enabled", False):
            # accelerate (1.15) does set DeepSpeed up, also on CPU with gloo ranks; but its backward
            # is engine.backward + engine.step() at every accumulation boundary, so the optimizer
            # would step between the clean and the adversarial pass (docs/hf.md, "DeepSpeed").
            reasons.append("TrainingArguments(deepspeed=...) (accelerate's DeepSpeed backward runs engine.backward "
                           "AND engine.step() at every accumulation boundary, so the optimizer would step between "
                           "the clean and the adversarial pass and the step would use the clean gradient alone); "
                           "use a plain DeepSpeed engine loop instead, where fused_adv.FGM(engine) / PGD / MIFGSM / "
                           "AWP(engine, engine.optimizer) / SAM.from_engine / AdvWeightPerturb(engine) support "
                           "ZeRO-0 to 3 (README, \"DeepSpeed\")")
        if getattr(self, "is_fsdp_enabled", False):
            plugin = getattr(getattr(getattr(self, "accelerator", None), "state", None), "fsdp_plugin", None)
            if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1 and not getattr(plugin, "use_orig_params", True):
                reasons.append("FSDP1 with use_orig_params=False (the weights are flattened into _flat_param "
                               "tensors): set fsdp_config={'use_orig_params': True} (accelerate: "
                               "fsdp_use_orig_params: true) or use FSDP2 (fsdp_version: 2)")
        method = self.__dict__.get("_adv_cfg")
        method = getattr(method, "method", None)
        if method == "yopo" and _sharded(self.model):
            reasons.append("adversarial='yopo' on sharded parameters (FSDP1/FSDP2): not supported yet "
                           "(docs/hf.md, \"Sharded training\"); fgm, fgsm, pgd, awp, mifgsm, awp_paper, sam, smart, "
                           "sift and freelb are")
        try:
            from transformers.utils import is_sagemaker_mp_enabled
            if is_sagemaker_mp_enabled():
                reasons.append("SageMaker model parallel (its training step bypasses compute_loss/backward)")
        except ImportError:  # pragma: no cover
            pass
        if reasons:
            raise NotImplementedError("fused_adv AdversarialTrainerMixin does not support " + "; ".join(reasons))

    def _adv_build(self, model: nn.Module, cfg: AdversarialConfig) -> Strategy:
        """The strategy for ``model``, built now if there is none or it was built on another model."""
        strategy = self.__dict__.get("_adv_strategy")
        if strategy is not None and strategy.model is model:
            return strategy
        self._adv_check_supported()
        self._adv_release()
        self._adv_strategy = STRATEGIES[cfg.method](self, model, cfg)
        return self._adv_strategy

    # -- Trainer hooks ---------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None, *args, **kwargs) -> torch.Tensor:
        """The Trainer's step plus the configured adversarial pass(es) (docs/hf.md, "One step");
        returns the clean loss as the Trainer scales it (FreeLB: the mean adversarial loss)."""
        pass_args = ((num_items_in_batch,) if (num_items_in_batch is not None or trainer_step_takes_num_items())
                     else ()) + tuple(args)
        passes = Passes(self, super().training_step, model, inputs, pass_args, kwargs)
        cfg = self._adv_config()
        if cfg.method is None or not self._adversarial_active(cfg):
            return passes.plain()
        loss, adv_loss = self._adv_build(model, cfg).step(passes)
        self._adv_meter.record(adv_loss)
        return loss

    def log(self, logs: dict, *args, **kwargs):
        """Adds ``adv_loss`` next to the Trainer's (clean) ``loss``: the adversarial loss per optimizer
        step since the last log, averaged like ``loss`` (non-finite micro-batch values left out)."""
        meter = self.__dict__.get("_adv_meter")
        if meter is not None and "loss" in logs:
            value = meter.pop(self.state.global_step, getattr(self, "accelerator", None))
            if value is not None:
                logs["adv_loss"] = value
        return super().log(logs, *args, **kwargs)


def _sharded(model) -> bool:
    """True when some parameter is sharded (an FSDP2/TP DTensor or an FSDP1 original parameter)."""
    from fused_adv.sharding import ShardingLayout
    return model is not None and any(ShardingLayout.maybe_sharded(p) for p in model.parameters())


@functools.lru_cache(maxsize=None)
def _adversarial_class(base: type) -> type:
    return type(f"Adversarial{base.__name__}", (AdversarialTrainerMixin, base),
                {"__module__": base.__module__, "__doc__": f"{base.__name__} + fused_adv AdversarialTrainerMixin"})


def make_adversarial(trainer, adversarial: str | None = "awp", **adversarial_kwargs):
    """Turn an existing Trainer instance (any ``transformers.Trainer`` subclass) into an adversarial
    one in place: its class is swapped for a dynamic subclass ``(AdversarialTrainerMixin, type(trainer))``
    (cached per class; a trainer that already has the mixin is only reconfigured) and configured with
    ``adversarial`` and ``adversarial_kwargs`` (method arguments and integration options, docs/hf.md).
    Returns the same trainer.  Raises what ``AdversarialConfig.build`` raises, before any change.

        trainer = SFTTrainer(...)
        make_adversarial(trainer, "awp", adv_lr=1e-3, adv_eps=1e-2, start_epoch=1)
        trainer.train()
    """
    cfg = AdversarialConfig.build(adversarial, adversarial_kwargs)
    if not isinstance(trainer, AdversarialTrainerMixin):
        trainer.__class__ = _adversarial_class(type(trainer))
    trainer._adv_apply(cfg)
    return trainer
