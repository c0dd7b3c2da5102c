"""The Kaggle (Feedback Prize) AWP class, step for step (SPEC.md §4): the oracle for the fused one.

Keeps three extra copies of every perturbed weight (backup, lo, hi), runs a Python loop with a
host sync per tensor, and restores by re-pointing ``param.data``.  The optimizer step that
follows uses ONLY the last adversarial gradient (the clean one is zeroed).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


def model_loss(model, x, y, attention_mask) -> torch.Tensor:
    """The Kaggle call convention: model(input_ids=x, attention_mask=..., labels=y); the loss
    is ``.loss`` or the first element of the output, averaged."""
    out = model(input_ids=x, attention_mask=attention_mask, labels=y)
    loss = out.loss if hasattr(out, "loss") else out[0]
    return loss.mean()


def adversarial_autocast(enabled: bool | None):
    """The Kaggle class wraps the adversarial forward in CUDA autocast (a no-op for CPU ops)."""
    if enabled is None:
        enabled = torch.cuda.is_available()
    return torch.autocast(device_type="cuda", enabled=True) if enabled else contextlib.nullcontext()


def adversarial_backward(awp, x, y, attention_mask, closure, backward) -> torch.Tensor:
    """One adversarial pass of the Kaggle class: forward (under its autocast), zero the grads (the
    clean gradient is DISCARDED), backward through the scaler when there is one.  Shared by the
    reference and the fused AWP so both run exactly the same pass."""
    with adversarial_autocast(awp.autocast):
        adv_loss = closure() if closure is not None else model_loss(awp.model, x, y, attention_mask)
    awp.optimizer.zero_grad()
    if backward is not None:
        backward(adv_loss)
    elif awp.scaler is not None:
        awp.scaler.scale(adv_loss).backward()
    else:
        adv_loss.backward()
    return adv_loss


class AWP:
    def __init__(self, model, optimizer, adv_param: str = "weight", adv_lr: float = 1.0, adv_eps: float = 0.2,
                 start_epoch: int = 0, adv_step: int = 1, scaler=None, autocast: bool | None = None):
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
        if (self.adv_lr == 0) or (epoch < self.start_epoch):
            return None
        self._save()
        adv_loss = None
        for _ in range(self.adv_step):
            self._attack_step()
            adv_loss = adversarial_backward(self, x, y, attention_mask, closure, backward)
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
