"""Fused drop-in AWP, the Kaggle (Feedback Prize) class (docs/methods.md §4 (AWP (Kaggle))).

Per adversarial step: ONE multi-tensor reduction (||G||^2 and ||P||^2 of every perturbed tensor
in one launch) and ONE multi-tensor update pass (reads P and G, writes the backup on the first
step and P) with the box B +- adv_eps*|B| recomputed from the backup on the fly: one extra copy
of the weights instead of three, no host sync.  Restore is one multi-tensor copy, bit-exact,
and always happens, also when the adversarial forward/backward raises.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from fused_adv import ops
from fused_adv._shared import awp_adversarial_pass
from fused_adv.methods._common import (AttackStateError, Attacked, BackupPool, Perturbation, check_restore_mode,
                                       no_grad, no_gradient_error, select_params)
from fused_adv.sharding_deepspeed import is_engine


class AWP(Perturbation):
    """``AWP(model, optimizer, adv_param='weight', adv_lr=1.0, adv_eps=0.2, start_epoch=0,
    adv_step=1, scaler=None, *, backend='auto', autocast=None, restore_mode='copy')``.

    ``attack_backward(x, y, attention_mask, epoch)`` (Kaggle convention: the loss of
    ``model(input_ids=x, attention_mask=attention_mask, labels=y)``) or
    ``attack_backward(closure=fn, epoch=epoch, backward=None)`` where ``fn()`` returns the
    adversarial loss and ``backward(loss)`` replaces the default backward (``scaler.scale(loss)
    .backward()``, ``engine.backward(loss)`` when ``model`` is a DeepSpeed engine, or
    ``loss.backward()``).  For each of ``adv_step`` steps it perturbs every
    trainable parameter whose name contains ``adv_param`` and has a gradient, runs the
    adversarial forward (under CUDA autocast when CUDA is available, like the Kaggle class; set
    ``autocast=False/True`` to choose), zeroes the gradients (the clean gradient is DISCARDED,
    as in the Kaggle class) and backpropagates; then restores the weights.  Returns the last
    adversarial loss (detached), or None when skipped (adv_lr == 0 or epoch < start_epoch).

    Lower level: ``attack_step(first=True)`` / ``restore()``, or ``with awp.perturbed(): ...``.
    """

    def __init__(self, model: nn.Module, optimizer, adv_param: str = "weight", adv_lr: float = 1.0,
                 adv_eps: float = 0.2, start_epoch: int = 0, adv_step: int = 1, scaler=None, *,
                 backend: str = "auto", autocast: bool | None = None, restore_mode: str = "copy"):
        """Stores the arguments (see the class docstring; ``backend``: 'auto' | 'cuda' | 'triton' |
        'cpp' | 'torch'; ``restore_mode``: 'copy' | 'swap').  Allocates nothing until the first
        attack.  Raises ValueError when ``adv_step < 1`` or ``restore_mode`` is unknown."""
        if adv_step < 1:
            raise ValueError(f"adv_step must be >= 1, got {adv_step}")
        self.model = model
        self.optimizer = optimizer
        self.adv_param = adv_param
        self.adv_lr = adv_lr
        self.adv_eps = adv_eps
        self.start_epoch = start_epoch
        self.adv_step = adv_step
        self.scaler = scaler
        self.backend = backend
        self.autocast = autocast
        self.restore_mode = check_restore_mode(restore_mode)
        self._pool = BackupPool()
        self._attacked: list[tuple[nn.Parameter, torch.Tensor]] | None = None  # (param, backup)

    # -- the Kaggle entry point --------------------------------------------------------------
    def attack_backward(self, x=None, y=None, attention_mask=None, epoch: int = 0, *,
                        closure: Callable[[], torch.Tensor] | None = None,
                        backward: Callable[[torch.Tensor], None] | None = None):
        """The adversarial part of a training step, after the clean backward (see the class
        docstring for the arguments).

        Mutates the selected parameters in place (restored bit for bit before returning, also
        when the pass raises) and every parameter's ``.grad`` (zeroed by ``optimizer.zero_grad()``
        then set to the adversarial gradient of the last step).  Returns the last adversarial loss
        detached (0-dim, the loss's dtype), or None when skipped.  Raises TypeError when neither
        ``x`` nor ``closure`` is given, ValueError when ``adv_param`` matches no trainable
        parameter, and whatever the forward/backward raise (after restoring the weights).
        """
        if (self.adv_lr == 0) or (epoch < self.start_epoch):
            return None
        if closure is None and x is None:
            raise TypeError("AWP.attack_backward needs (x, y, attention_mask, epoch) or closure=")
        if backward is None and self.scaler is None and is_engine(self.model):
            backward = self.model.backward  # DeepSpeed: its backward reduces and partitions the gradients
        adv_loss = None
        try:
            for step in range(self.adv_step):
                self.attack_step(first=(step == 0))
                adv_loss = awp_adversarial_pass(self.model, self.optimizer, x=x, y=y, attention_mask=attention_mask,
                                                closure=closure, backward=backward, scaler=self.scaler,
                                                autocast=self.autocast)
        finally:
            if self._attacked is not None:
                self.restore()
        return None if adv_loss is None else adv_loss.detach()

    # -- building blocks -----------------------------------------------------------------------
    @no_grad
    def attack_step(self, first: bool = True) -> None:
        """One perturbation step, in place: ``P += adv_lr * G/(||G||+e) * (||P||+e)`` (skipped on the
        device when ||G|| is 0 or NaN), clamped to the box ``B -+ adv_eps*|B|`` around the backup.

        ``first`` selects the parameters (trainable, with a grad, name containing ``adv_param``:
        :func:`fused_adv.methods._common.select_by_name` with ``require_grad=True``) and backs
        them up into the pool; later steps reuse that selection and skip parameters whose
        ``.grad`` is None now.  Parameters of any float dtype; ``.grad`` is read, not changed.
        Raises AttackStateError for ``first=True`` while attacked or ``first=False`` before a
        first step, ValueError when ``adv_param`` matches no trainable parameter; when a step
        raises, nothing has moved (on a first step nothing is attacked either)."""
        if first:
            if self._attacked is not None:
                raise AttackStateError("AWP.attack_step(first=True) called again before restore()")
            self._sharding()
            # Selected without the grad filter: under FSDP1 .grad is None on ranks that hold none
            # of a parameter, and every rank must see the same slots.
            self._slots = select_params(self.model, self.adv_param, what="adv_param")
            grads = [p.grad for p in self._slots]
        elif self._attacked is None:
            raise AttackStateError("AWP.attack_step(first=False) before attack_step(first=True)")
        else:
            # A parameter may have lost its grad after the first step (no adversarial gradient):
            # the Kaggle class skips it for that step, and so do we (it stays saved and restored).
            saved = {id(p) for p, _ in self._attacked}
            grads = [p.grad if id(p) in saved else None for p in self._slots]
        loc = self._localize(self._slots, grads)
        if first and not loc.live and not loc.sharded:  # sharded: a rank may hold no piece; ZeRO checks its own state
            raise no_gradient_error("AWP", "adv_param", self.adv_param)
        if not (loc.live or loc.sharded):
            return
        n = len(loc.params)
        sumsq = ops.multi_tensor_sumsq(loc.grads + loc.params, backend=self.backend)  # one launch, 2N norms
        sumsq = loc.reduce(sumsq.view(2, n), dim=1)
        if not first:
            known = {id(p): b for p, b in self._attacked}
            backups = [known[id(self._slots[i])] for i in loc.live]
            self._perturb(loc, backups, sumsq, False)
            return
        all_live = loc.params is self._slots  # unsharded, every slot live: the cached selection itself
        chosen = self._slots if all_live else [self._slots[i] for i in loc.live]
        backups = self._pool.reuse(chosen) if all_live else None
        if backups is None:
            backups = self._pool.get(chosen, like=loc.params)
            self._perturb(loc, backups, sumsq, True)
        else:
            try:
                self._perturb(loc, backups, sumsq, True)
            except ValueError:
                # The reused backups were not re-checked (BackupPool.reuse): a parameter changed
                # dtype, device or shape since the last step.  The op refused before writing;
                # re-check (reallocating what changed) and step again (raising a real error).
                backups = self._pool.get(chosen, like=loc.params)
                self._perturb(loc, backups, sumsq, True)
        # Marked attacked only now that the backups hold the weights: a step that raised has
        # moved nothing, and a restore from unwritten backups would overwrite the weights.
        self._attacked = Attacked(chosen, backups)

    def _perturb(self, loc, backups, sumsq, first: bool) -> None:
        ops.awp_perturb_(loc.params, loc.grads, backups, sumsq[0], sumsq[1], self.adv_lr, self.adv_eps, first,
                         backend=self.backend)

    @contextlib.contextmanager
    def perturbed(self, steps: int = 1):  # AWP's attack is attack_step: its own perturbed()
        """Context manager: ``steps`` calls of :meth:`attack_step` on entry (using the gradients
        as they are), :meth:`restore` on exit, also when the block or a step raises.  Yields self.
        Raises what :meth:`attack_step` raises."""
        try:
            for step in range(steps):
                self.attack_step(first=(step == 0))
            yield self
        finally:
            if self._attacked is not None:
                self.restore()
