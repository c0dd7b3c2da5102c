"""The Kaggle (Feedback Prize) AWP class, step for step: the oracle for the fused one
(docs/methods.md §4 (AWP (Kaggle))).

Keeps three extra copies of every perturbed weight (backup, lo, hi), runs a Python loop with a
host sync per tensor, and restores by re-pointing ``param.data``.  The optimizer step that
follows uses ONLY the last adversarial gradient (the clean one is zeroed).
"""
from __future__ import annotations

from typing import Callable

import torch

from fused_adv._shared import awp_adversarial_pass


class AWP:
    """``AWP(model, optimizer, adv_param='weight', adv_lr=1.0, adv_eps=0.2, start_epoch=0, adv_step=1,
    scaler=None, autocast=None)``: the Kaggle class.

    Args:
        model: the nn.Module whose parameters are perturbed.
        optimizer: its optimizer (only ``zero_grad()`` is called, to discard the clean gradient).
        adv_param: substring of the names of the parameters to perturb ('weight').
        adv_lr: step size relative to the weight norm (0 turns AWP off).
        adv_eps: half-width of the box around each weight, relative to |weight|.
        start_epoch: ``attack_backward`` does nothing for ``epoch < start_epoch``.
        adv_step: perturbation steps (adversarial forward/backward passes) per call.
        scaler: a ``torch.cuda.amp.GradScaler`` (or anything with ``.scale(loss)``) or None.
        autocast: run the adversarial forward under CUDA autocast (None: when CUDA is available).

    State: ``backup`` (name -> clone of the weight) and ``backup_eps`` (name -> (lo, hi)) while a
    call is in progress; both are empty between calls.
    """

    def __init__(self, model, optimizer, adv_param: str = "weight", adv_lr: float = 1.0, adv_eps: float = 0.2,
                 start_epoch: int = 0, adv_step: int = 1, scaler=None, autocast: bool | None = None):
        """Stores the arguments (see the class docstring); allocates nothing.  Raises nothing."""
        self.model = model
        self.optimizer = optimizer
        self.adv_param = adv_param
        self.adv_lr = adv_lr
        self.adv_eps = adv_eps
        self.start_epoch = start_epoch
        self.adv_step = adv_step
        self.scaler = scaler
        self.autocast = autocast
        self.backup: dict[str, torch.Tensor] = {}
        self.backup_eps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def attack_backward(self, x=None, y=None, attention_mask=None, epoch: int = 0, *,
                        closure: Callable[[], torch.Tensor] | None = None,
                        backward: Callable[[torch.Tensor], None] | None = None):
        """The adversarial part of a training step, after the clean backward.

        ``x``, ``attention_mask``: [B, L] token ids / mask and ``y`` the labels of the Kaggle
        convention ``model(input_ids=x, attention_mask=attention_mask, labels=y)``; or
        ``closure()`` returning the adversarial loss; ``backward(loss)`` replaces the default
        backward (``scaler.scale(loss).backward()`` or ``loss.backward()``).

        For each of ``adv_step`` steps: perturbs every trainable parameter whose name contains
        ``adv_param`` and whose ``.grad`` is not None (``P += adv_lr * G/(|G|+e) * (|P|+e)``,
        skipped when |G| is 0 or NaN, then clamped to the box ``B -+ adv_eps*|B|``), runs the
        adversarial pass (:func:`fused_adv._shared.awp_adversarial_pass`: the clean gradient is
        ZEROED, the adversarial one computed); then re-points every ``param.data`` at its backup.

        Returns the last adversarial loss (not detached), or None when skipped (``adv_lr == 0`` or
        ``epoch < start_epoch``).  Mutates the parameters (restored at the end, by pointer) and
        their ``.grad``.  Raises what the forward/backward raise, leaving the weights PERTURBED
        (the community behaviour; the fused class restores them).
        """
        if (self.adv_lr == 0) or (epoch < self.start_epoch):
            return None
        self._save()
        adv_loss = None
        for _ in range(self.adv_step):
            self._attack_step()
            adv_loss = awp_adversarial_pass(self.model, self.optimizer, x=x, y=y, attention_mask=attention_mask,
                                            closure=closure, backward=backward, scaler=self.scaler,
                                            autocast=self.autocast)
        self._restore()
        return adv_loss

    def _attack_step(self) -> None:
        e = 1e-6
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name and name in self.backup:
                norm1 = torch.norm(param.grad)
                norm2 = torch.norm(param.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    r_at = self.adv_lr * param.grad / (norm1 + e) * (norm2 + e)
                    param.data.add_(r_at)
                    param.data = torch.min(torch.max(param.data, self.backup_eps[name][0]), self.backup_eps[name][1])

    def _save(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                if name not in self.backup:
                    self.backup[name] = param.data.clone()
                    grad_eps = self.adv_eps * param.abs().detach()
                    self.backup_eps[name] = (self.backup[name] - grad_eps, self.backup[name] + grad_eps)

    def _restore(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup = {}
        self.backup_eps = {}
