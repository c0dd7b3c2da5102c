"""SAM / ASAM as davda54/sam does it (sam.py), step for step: the oracle for the fused class
(docs/methods.md §11 (SAM)).

A per-tensor Python loop: one norm per tensor plus a norm of the stacked norms for the global
norm, one ``p.data.clone()`` backup per tensor (kept in ``state[p]["old_p"]``), and the restore
re-points ``p.data`` at that clone.  ``adaptive=True`` is ASAM (Kwon et al. 2021): the norm is
taken of |P|*G and the step is P^2*G*scale.

The one addition to the original: ``second_step(..., scaler=...)`` for GradScaler loops (restore,
then ``scaler.step(self.base_optimizer)`` instead of ``self.base_optimizer.step()``); with the
default ``scaler=None`` it is the original's code.
"""
from __future__ import annotations

import torch


class SAM(torch.optim.Optimizer):
    """``SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs)``: davda54's class.

    Args:
        params: parameters or param-group dicts (each group may set its own ``rho`` and
            ``adaptive``).
        base_optimizer: the optimizer CLASS (e.g. ``torch.optim.SGD``); it is built as
            ``base_optimizer(self.param_groups, **kwargs)`` and shares SAM's param groups.
        rho: neighbourhood radius (ASAM uses ~2.0).
        adaptive: ASAM's element-wise scaling by |P|.

    ``first_step(zero_grad=False)``: per param with a grad, ``state[p]["old_p"] = p.data.clone()``,
    P += (P^2 if adaptive else 1) * G * rho/(||(|P| if adaptive else 1)*G|| + 1e-12), the norm
    global over every param with a grad.  ``second_step(zero_grad=False)``: ``p.data = old_p``
    for every param with a grad, then ``base_optimizer.step()``.  ``step(closure)``: first_step
    (zero_grad=True), ``closure()`` (under enable_grad), second_step.  Raises AssertionError for
    rho < 0 or a missing closure (as the original).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        assert rho >= 0.0, f"Invalid rho, should be non-negative: {rho}"

        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)

        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)

            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)  # climb to the local maximum "w + e(w)"

        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]  # get back to "w" from "w + e(w)"

        if scaler is None:
            self.base_optimizer.step()  # do the actual "sharpness-aware" update
        else:  # GradScaler loop: unscales (unless done), skips on inf/NaN; the caller updates it
            scaler.step(self.base_optimizer)

        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is not None, "Sharpness Aware Minimization requires closure, but it was not provided"
        closure = torch.enable_grad()(closure)  # the closure should do a full forward-backward pass

        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def _grad_norm(self):
        shared_device = self.param_groups[0]["params"][0].device  # in case of model parallelism
        norm = torch.norm(
            torch.stack([
                ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
                for group in self.param_groups for p in group["params"]
                if p.grad is not None
            ]),
            p=2,
        )
        return norm

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
