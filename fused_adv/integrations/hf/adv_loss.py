"""The ``adv_loss`` logged next to the Trainer's (clean) ``loss`` (docs/hf.md, "Logged losses")."""
from __future__ import annotations

import math

import torch


class AdvLossMeter:
    """Sums the adversarial loss of each micro-batch on the device (no host sync per step) until
    the next log; non-finite values are left out of the mean but counted as recorded."""

    def __init__(self):
        self.loss_sum = None           # sum of finite adversarial losses (tensor)
        self.loss_finite = None        # how many of them were finite (tensor)
        self.loss_count = 0            # how many were recorded
        self.last_logged_step = 0

    def record(self, adv_loss: torch.Tensor | None) -> None:
        """Add one micro-batch's adversarial loss (a scalar tensor, any dtype); None is ignored."""
        if adv_loss is None:
            return
        adv_loss = adv_loss.detach().float().reshape(())
        finite = torch.isfinite(adv_loss)
        value = torch.where(finite, adv_loss, torch.zeros_like(adv_loss))
        if self.loss_sum is None:
            self.loss_sum, self.loss_finite = value, finite.float()
        else:
            self.loss_sum = self.loss_sum + value
            self.loss_finite = self.loss_finite + finite.float()
        self.loss_count += 1

    def pop(self, global_step: int, accelerator=None) -> float | None:
        """The adversarial loss per optimizer step since the last ``pop`` (summed over processes
        when ``accelerator`` has several), averaged like the Trainer's ``loss``; NaN if every
        value was non-finite, None if nothing was recorded.  Resets the sums."""
        if not self.loss_count:
            return None
        steps = max(1, global_step - self.last_logged_step)
        pair = torch.stack([self.loss_sum, self.loss_finite])
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            pair = accelerator.gather(pair.reshape(1, 2)).sum(0)
        total, finite = pair.tolist()
        # mean of the finite values, counted as many times as values were recorded, per step
        value = total / finite * self.loss_count / steps if finite > 0 else math.nan
        self.loss_sum = self.loss_finite = None
        self.loss_count = 0
        self.last_logged_step = global_step
        return value
