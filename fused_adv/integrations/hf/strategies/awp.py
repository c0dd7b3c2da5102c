"""awp: perturb the weights ``adv_param`` selects, ``adv_step`` times, each followed by an
adversarial pass on zeroed grads; restore (docs/hf.md, "awp"; docs/methods.md §4 (AWP (Kaggle)))."""
from __future__ import annotations

import fused_adv

from .base import Strategy, check_at_least_one, hand_back, set_aside


class AWPStrategy(Strategy):
    """Clean pass; ``adv_step`` times: ``attack_step``, grads zeroed, adversarial pass; the optimizer
    step uses ONLY the last adversarial gradient of this micro-batch (earlier micro-batches' grads
    are set aside and handed back before the final backward, never zeroed)."""

    name = "awp"
    method_class = fused_adv.AWP
    provided = Strategy.provided | {"optimizer"}
    options = ("perturb_from", "clean_pass_no_sync")
    shared_options = ("start_epoch",)      # AWP's own argument has the integration's meaning

    @classmethod
    def validate(cls, cfg) -> None:
        check_at_least_one(cfg.method_kwargs, "adv_step")

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.method_kwargs.get("adv_lr", 1.0) != 0

    def __init__(self, trainer, model, cfg):
        super().__init__(trainer, model, cfg)
        optimizer = getattr(trainer, "optimizer", None)
        # AcceleratedOptimizer.zero_grad() is a no-op on non-sync micro-batches; we never let the
        # class zero grads anyway (we use attack_step/restore), but hand it the real optimizer.
        optimizer = getattr(optimizer, "optimizer", optimizer)
        self.attacker = fused_adv.AWP(model, optimizer, backend=cfg.backend, **cfg.method_kwargs)
        adv_param = self.attacker.adv_param
        # the parameters adv_param may select: perturb_from="accumulated" adds their earlier grads
        self.param_ids = {id(p) for n, p in model.named_parameters() if p.requires_grad and adv_param in n}

    def step(self, passes):
        awp, cfg = self.attacker, self.cfg
        if (passes.trainer.state.epoch or 0.0) < awp.start_epoch:
            return passes.plain(), None
        # Everything accumulated so far is set aside: only THIS micro-batch's clean grad is discarded.
        stash = set_aside(p for p in passes.model.parameters() if p.grad is not None)
        try:
            loss, prepared = passes.clean(cfg.clean_pass_no_sync)
            if cfg.perturb_from == "accumulated":
                for p, g in stash:              # direction from (earlier micro-batches + this one)
                    if id(p) in self.param_ids:
                        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            for i in range(awp.adv_step):
                awp.attack_step(first=(i == 0))
                passes.model.zero_grad(set_to_none=True)   # the clean (or previous adversarial) grad is discarded
                last = i == awp.adv_step - 1
                if last:
                    hand_back(stash)                       # earlier micro-batches' grads, before the final backward
                adv_loss = passes.adversarial(prepared, cfg.clean_pass_no_sync and not last)
        finally:
            if awp.is_attacked:
                awp.restore()
            hand_back(stash)
        return loss, adv_loss
