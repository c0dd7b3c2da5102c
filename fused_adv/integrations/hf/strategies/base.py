"""What every method of the HF integration is: a ``Strategy`` (its options and argument checks as
class data, ``__init__`` builds the attacker on the trainer's model, ``step`` runs one micro-batch),
and the gradient bookkeeping the weight-space strategies share (docs/hf.md, "Adding a method")."""
from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from torch import nn


class Strategy:
    """One adversarial method inside ``AdversarialTrainerMixin``.

    Class data read by ``AdversarialConfig.build`` (before any model exists):
    ``name`` (the ``adversarial=`` string), ``method_class`` (whose constructor arguments
    ``adversarial_kwargs`` may hold, less ``provided``), ``options`` (integration options it accepts
    beyond ``backend``/``start_step``/``start_epoch``), ``shared_options`` (options also handed to
    the method class).  An instance is built at the first adversarial step on the (wrapped) model
    the Trainer trains, and rebuilt when that model changes; ``release`` undoes the build.
    """

    name: ClassVar[str]
    method_class: ClassVar[type | None] = None
    provided: ClassVar[frozenset[str]] = frozenset({"self", "model", "backend"})
    options: ClassVar[tuple[str, ...]] = ()
    shared_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def method_arguments(cls) -> set[str]:
        """The names ``adversarial_kwargs`` may hold for the method itself."""
        return set(inspect.signature(cls.method_class.__init__).parameters) - cls.provided

    @classmethod
    def validate(cls, cfg) -> None:
        """Raise ValueError for a bad argument value in ``cfg.method_kwargs`` (names already checked)."""

    @classmethod
    def active(cls, cfg) -> bool:
        """False when the configured arguments make every step a plain one."""
        return True

    def __init__(self, trainer, model: nn.Module, cfg):
        self.cfg = cfg
        self.model = model          # the (wrapped) model this strategy was built on
        self.attacker = None        # the fused object the trainer exposes as ``adversary``

    def step(self, passes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one micro-batch through ``passes`` (a ``Passes``) -> (the loss ``training_step``
        returns, the adversarial loss to log as ``adv_loss`` or None)."""
        raise NotImplementedError(f"{type(self).__name__}.step")

    def release(self) -> None:
        """Undo what building did to the model (nothing, unless a strategy hooks the model)."""


def check_at_least_one(kwargs: dict, name: str) -> None:
    """ValueError unless ``kwargs[name]`` (a step count, 1 if absent) is >= 1."""
    if int(kwargs.get(name, 1)) < 1:
        raise ValueError(f"{name} must be >= 1, got {kwargs[name]}")


def set_aside(params) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Move the existing ``.grad`` of ``params`` aside (no copy; a copy for FSDP1 parameters, whose
    ``.grad`` is a view that FSDP1 zeroes in place once it is None); ``.grad`` becomes None."""
    stash = []
    for p in params:
        if p.grad is not None:
            fsdp1 = getattr(p, "_fsdp_flattened", False) and type(p.grad) is torch.Tensor
            stash.append((p, p.grad.clone() if fsdp1 else p.grad))
            p.grad = None
    return stash


def hand_back(stash) -> None:
    """Add set-aside grads back: ``.grad = aside + .grad`` (the aside tensor keeps its identity,
    which DDP's bucket views like).  Empties ``stash``, so a second call does nothing."""
    for p, g in stash:
        if p.grad is not None:
            g.add_(p.grad)
        p.grad = g
    stash.clear()


def set_trainable(params, flag: bool) -> None:
    """``requires_grad_(flag)`` on ``params``; switching off also drops their ``.grad``."""
    for p in params:
        if not flag:
            p.grad = None
        p.requires_grad_(flag)
