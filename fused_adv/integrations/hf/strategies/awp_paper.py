"""awp_paper: the AWP paper's step (docs/hf.md, "awp_paper"; docs/methods.md §4b (AWP (paper))):
the weights are perturbed BEFORE the training pass and restored AFTER the optimizer step.

Per optimizer step: at its first micro-batch, ``calc_awp`` takes the direction from that
micro-batch's loss (``trainer.compute_loss`` on the unwrapped model, under the Trainer's autocast)
and ``perturb`` moves the weights; every micro-batch of the step then runs the Trainer's plain
step at the perturbed weights (the paper trains on the adversarial loss only); a post-step hook on
the optimizer calls ``restore`` right after ``optimizer.step()``.  A step the optimizer did not take
(the GradScaler skipped it on inf/NaN) is restored at the next micro-batch.
"""
from __future__ import annotations

import copy

import torch

import fused_adv

from ..passes import shallow_copy, unwrap
from .base import Strategy


class AWPPaperStrategy(Strategy):
    """Method arguments: ``gamma`` (default 0.01), ``proxy_lr`` (0.01) and ``proxy`` (bool, default
    False): False runs proxy-free (the direction from the gradient, no model copy); True keeps the
    paper's proxy (a deep copy of the model with ``torch.optim.SGD(lr=proxy_lr)``)."""

    name = "awp_paper"
    method_class = fused_adv.AdvWeightPerturb
    provided = Strategy.provided | {"proxy", "proxy_optim"}

    @classmethod
    def method_arguments(cls) -> set[str]:
        return super().method_arguments() | {"proxy"}

    @classmethod
    def validate(cls, cfg) -> None:
        proxy = cfg.method_kwargs.get("proxy", False)
        if not isinstance(proxy, bool):
            raise ValueError(f"awp_paper: proxy must be True or False (a copy is made for you), got {proxy!r}")

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.method_kwargs.get("gamma", 0.01) != 0   # the paper: gamma <= 0 turns AWP off

    def __init__(self, trainer, model, cfg):
        super().__init__(trainer, model, cfg)
        if int(getattr(trainer.args, "world_size", 1)) > 1:
            raise NotImplementedError(
                "adversarial='awp_paper' runs on one process: each rank would take its own direction "
                "and the replicas would drift apart after restore (use 'awp' for DDP)")
        kwargs = dict(cfg.method_kwargs)
        use_proxy = kwargs.pop("proxy", False)
        target = unwrap(trainer, model)
        proxy = proxy_optim = None
        if use_proxy:
            proxy = copy.deepcopy(target)
            proxy_optim = torch.optim.SGD(proxy.parameters(), lr=kwargs.get("proxy_lr", 0.01))
        self.attacker = fused_adv.AdvWeightPerturb(target, proxy, proxy_optim, backend=cfg.backend, **kwargs)
        self._diff = None
        self._step = None          # the global_step the weights were perturbed at
        optimizer = getattr(trainer, "optimizer", None)
        optimizer = getattr(optimizer, "optimizer", optimizer)   # AcceleratedOptimizer wraps the real one
        self._hook = (optimizer.register_step_post_hook(lambda *_: self._restore())
                      if isinstance(optimizer, torch.optim.Optimizer) else None)

    def _restore(self) -> None:
        if self.attacker.is_attacked:
            self.attacker.restore(self._diff)
        self._diff = self._step = None

    def step(self, passes):
        tr = passes.trainer
        step = tr.state.global_step
        if self.attacker.is_attacked and self._step != step:
            self._restore()        # the optimizer did not step (skipped, or no hook): undo before a new direction
        if not self.attacker.is_attacked:
            prepared = tr._prepare_inputs(passes.inputs)
            with tr.compute_loss_context_manager():
                diff = self.attacker.calc_awp(closure=lambda m: tr.compute_loss(m, shallow_copy(prepared)))
            self.attacker.perturb(diff)
            self._diff, self._step = diff, step
        try:
            loss = passes.plain()
        except BaseException:
            self._restore()        # nothing left perturbed when the pass raises
            raise
        return loss, None

    def release(self) -> None:
        self._restore()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
