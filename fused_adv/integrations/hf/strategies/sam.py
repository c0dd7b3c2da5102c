"""sam / asam: climb to w + e(w) along this micro-batch's gradient, take the gradient there,
restore w; the Trainer's own optimizer then steps with it (docs/hf.md, "sam / asam";
docs/methods.md §11 (SAM))."""
from __future__ import annotations

import fused_adv

from .base import Strategy, hand_back, set_aside


class SAMStrategy(Strategy):
    """Clean pass; ``first_step`` of a :class:`fused_adv.SAM` wrapped around the Trainer's optimizer
    (its param groups: every parameter the optimizer trains and that has a gradient); grads zeroed;
    the second pass at w + e(w); restore (also when the pass raises).  The Trainer then clips (the
    SECOND gradient, ``max_grad_norm``) and steps its own optimizer, scheduler and GradScaler as for
    any step: SAM's base optimizer is the Trainer's.

    Gradient accumulation: earlier micro-batches' grads are set aside during the clean pass and
    handed back before the second backward, so each micro-batch climbs from its own gradient
    (``perturb_from="accumulated"``: from the sum so far) and the step sums the second gradients.
    ``clean_pass_no_sync=True`` runs the clean pass without the DDP all-reduce: each rank climbs
    along its own gradient (the per-replica "m-sharpness" variant of the SAM paper) and the second
    pass all-reduces as usual; the default all-reduces both (the single-process numbers).
    With a GradScaler the clean gradient is the SCALED one (the climb is scale-invariant, and a
    non-finite clean gradient skips the climb on the device); the second one is unscaled by the
    Trainer's step."""

    name = "sam"
    method_class = fused_adv.SAM
    options = ("perturb_from", "clean_pass_no_sync")
    default_rho = 0.05
    default_adaptive = False

    @classmethod
    def method_arguments(cls) -> set[str]:
        return {"rho", "adaptive"}

    @classmethod
    def validate(cls, cfg) -> None:
        rho = cfg.method_kwargs.get("rho", cls.default_rho)
        if not float(rho) >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.method_kwargs.get("rho", cls.default_rho) != 0

    def __init__(self, trainer, model, cfg):
        super().__init__(trainer, model, cfg)
        optimizer = getattr(trainer, "optimizer", None)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer -> the torch optimizer
        if optimizer is None:
            raise RuntimeError("adversarial='sam'/'asam' needs the Trainer's optimizer (built before the first step)")
        kw = cfg.method_kwargs
        self.attacker = fused_adv.SAM.from_optimizer(optimizer, rho=kw.get("rho", self.default_rho),
                                                     adaptive=kw.get("adaptive", self.default_adaptive),
                                                     backend=cfg.backend, model=model)
        self.param_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}

    def step(self, passes):
        sam, cfg = self.attacker, self.cfg
        stash = set_aside(p for p in passes.model.parameters() if p.grad is not None)
        try:
            loss, prepared = passes.clean(cfg.clean_pass_no_sync)
            if cfg.perturb_from == "accumulated":
                for p, g in stash:              # direction from (earlier micro-batches + this one)
                    if id(p) in self.param_ids:
                        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            sam.first_step(zero_grad=False)
            passes.model.zero_grad(set_to_none=True)   # the clean grad only chose the direction
            hand_back(stash)                           # earlier micro-batches' grads, before the second backward
            adv_loss = passes.adversarial(prepared, no_sync=False)
        finally:
            if sam.is_perturbed:
                sam.restore()
            hand_back(stash)
        return loss, adv_loss


class ASAMStrategy(SAMStrategy):
    """ASAM: SAM with ``adaptive=True`` (the step scaled by |w|) and rho 2.0 by default."""

    name = "asam"
    default_rho = 2.0
    default_adaptive = True
