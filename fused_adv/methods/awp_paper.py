"""Fused drop-in for the AWP paper's ``AdvWeightPerturb`` (docs/methods.md §4b (AWP (paper))).

Same call forms as the paper's class (``calc_awp(inputs_adv, targets)``, ``perturb(diff)``,
``restore(diff)``), same numbers, fewer passes and, without a proxy, one model copy less:

* ``calc_awp`` ends in ONE multi-tensor reduction (||W||^2 and ||D||^2 of every perturbed weight
  in one launch); the diff ||W||/(||Delta|| + 1e-20) * Delta is never materialised: ``perturb`` and
  ``restore`` are each ONE pass ``W <- W -+ gamma * round(f * D)`` with the per-tensor factor f
  computed on the device from those statistics (no host sync).
* ``proxy=None``: with plain SGD the proxy's step is Delta = lr * grad CE(W) (the paper's proxy
  takes one SGD step on -CE), so the proxy model is arithmetic that can be skipped: the gradient is
  taken on the model itself (``torch.autograd.grad``, the model's ``.grad`` untouched) and Delta
  is exact instead of the difference of two nearly equal weights (no cancellation).  Saves the
  proxy's parameters and gradients.  Equal to the proxy version within the proxy's own
  cancellation error (tests/test_awp_paper.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fused_adv import ops
from fused_adv._torch.weight_ext import awp_paper_factor
from fused_adv.methods._common import AttackStateError, data_of
from fused_adv.sharding import ShardingError, ShardingLayout, _is_dtensor
from fused_adv.sharding_deepspeed import DeepSpeedLayout, deepspeed_layout


def _fsdp1_param(p) -> bool:
    return bool(getattr(p, "_fsdp_flattened", False)) and not _is_dtensor(p)


def perturbed_weights(model: nn.Module, layout: ShardingLayout | None = None) -> list[tuple[str, nn.Parameter]]:
    """The parameters the paper perturbs: name contains 'weight' and dim > 1 (no biases, no
    LayerNorm/BatchNorm weights), each once (tied weights under their first name).  ``layout``:
    the model's fused_adv.sharding layout, so that the dim is the full tensor's (an FSDP1
    parameter is a 1-D view of its shard)."""
    if layout is None:
        return [(n, p) for n, p in model.named_parameters() if "weight" in n and p.dim() > 1]
    # DeepSpeed ZeRO-3: the full shape is ds_shape (the parameter is empty outside forward)
    return [(n, p) for n, p in model.named_parameters()
            if "weight" in n and len(p.ds_shape if hasattr(p, "ds_shape") else layout.global_shape(p)) > 1]


class AWPDiff(Mapping):
    """What :meth:`AdvWeightPerturb.calc_awp` returns: a read-only mapping name -> diff tensor, like
    the paper's OrderedDict, that stores only the direction D of each weight and the per-tensor
    statistics.  ``diff[name]`` materialises ``round(f * D)`` (a new tensor, for inspection);
    ``perturb`` / ``restore`` never do."""

    def __init__(self, owner, names, params, dirs, param_sumsq, dir_sumsq, scale: float):
        self.owner = owner
        self.names = list(names)
        self.params = list(params)
        self.dirs = list(dirs)
        self.param_sumsq = param_sumsq
        self.dir_sumsq = dir_sumsq
        self.scale = float(scale)
        self._index = {n: i for i, n in enumerate(self.names)}

    def __getitem__(self, name: str) -> torch.Tensor:
        i = self._index[name]
        d = self.dirs[i]
        math = torch.float64 if d.dtype == torch.float64 else torch.float32
        f = awp_paper_factor(self.param_sumsq[i:i + 1], self.dir_sumsq[i:i + 1], self.scale)[0]
        return (d.to(math) * f.to(math)).to(d.dtype)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def nbytes(self) -> int:
        """Bytes held by the directions (one copy of the perturbed weights)."""
        return sum(d.numel() * d.element_size() for d in self.dirs)


class AdvWeightPerturb:
    """``AdvWeightPerturb(model, proxy=None, proxy_optim=None, gamma=0.01, *, proxy_lr=0.01,
    backend='auto')``: fused drop-in for fused_adv.reference.AdvWeightPerturb.

    With ``proxy`` and ``proxy_optim`` (the paper's call form) the proxy step is taken exactly as
    the paper does (any optimizer).  With ``proxy=None`` the proxy is skipped: the ascent direction
    is the gradient of the loss on the model itself and Delta = ``proxy_lr`` * gradient, which is
    what the paper's proxy with ``torch.optim.SGD(lr=proxy_lr)`` (no momentum, no weight decay)
    computes.  Train loop, as the paper's::

        diff = awp.calc_awp(x_adv, y)      # or calc_awp(closure=lambda m: m(**batch).loss)
        awp.perturb(diff)
        loss = F.cross_entropy(model(x_adv), y); opt.zero_grad(); loss.backward(); opt.step()
        awp.restore(diff)                  # after the optimizer step (not bit-exact by design)

    ``with awp.perturbed(diff): ...`` restores also when the block raises.
    """

    def __init__(self, model: nn.Module, proxy: nn.Module | None = None, proxy_optim=None, gamma: float = 0.01,
                 *, proxy_lr: float = 0.01, backend: str = "auto"):
        """Stores the arguments; allocates nothing.  Raises ValueError when exactly one of ``proxy``
        and ``proxy_optim`` is given, when ``proxy`` is ``model``, or when ``model`` has no weight
        of dim > 1 whose name contains 'weight'."""
        if (proxy is None) != (proxy_optim is None):
            raise ValueError("AdvWeightPerturb: pass both proxy and proxy_optim (the paper's form), or neither "
                             "(proxy=None: the proxy step is computed from the gradient, with proxy_lr)")
        if proxy is model and proxy is not None:
            raise ValueError("AdvWeightPerturb: proxy must be a separate copy of the model (or None)")
        layout = ShardingLayout(model)  # docs/methods.md §12 (Sharded training)
        ds = deepspeed_layout(model)
        if ds is not None:
            if proxy is not None:
                raise ShardingError(
                    f"AdvWeightPerturb(proxy=...) under DeepSpeed ZeRO-{ds.stage}: the proxy's step would use this "
                    "rank's batch only (its gradient is not averaged over the ranks) and the ranks' weights would "
                    "drift apart; use proxy=None with proxy_lr= (the same numbers as the paper's proxy with "
                    "torch.optim.SGD(lr=proxy_lr)): its gradient goes through engine.backward")
            if ds.engine is None and ds.stage > 0:
                raise ShardingError(
                    f"AdvWeightPerturb(engine.module) under DeepSpeed ZeRO-{ds.stage}: pass the engine itself "
                    "(AdvWeightPerturb(engine)); restore() must know whether engine.step() ran since perturb()")
        if not perturbed_weights(model, layout):
            raise ValueError(f"AdvWeightPerturb: {type(model).__name__} has no parameter whose name contains "
                             "'weight' with dim > 1; the paper's AWP would perturb nothing")
        self.model = model
        self.proxy = proxy
        self.proxy_optim = proxy_optim
        self.gamma = gamma
        self.proxy_lr = proxy_lr
        self.backend = backend
        self._perturbed: AWPDiff | Mapping | None = None
        self._layout = layout
        self._ds = ds          # DeepSpeed engine layout (any stage), else None
        self._steps_at_perturb = None

    # ------------------------------------------------------------------ calc_awp
    def _loss(self, module: nn.Module, inputs_adv, targets, closure: Callable | None) -> torch.Tensor:
        if closure is None:
            return F.cross_entropy(module(inputs_adv), targets)
        return closure(module)

    def calc_awp(self, inputs_adv=None, targets=None, *, closure: Callable | None = None) -> AWPDiff:
        """The adversarial weight direction at the current weights.

        The loss is ``F.cross_entropy(m(inputs_adv), targets)`` (``m(x)`` returns logits) or
        ``closure(m)`` (a scalar tensor; e.g. ``lambda m: m(**batch).loss``), with m the proxy
        (loaded from the model, put in train mode, one ``proxy_optim`` step on -loss) or, when
        ``proxy=None``, the model itself in train mode (its mode is put back; its ``.grad`` is not
        touched; on sharded parameters the gradient comes from a ``backward()`` with ``.grad`` set
        aside and put back, see docs/methods.md §12 (Sharded training)).  Returns an :class:`AWPDiff` (name -> diff).  The model's weights are not changed.
        Raises ValueError for both or neither of (inputs_adv, targets) and ``closure``;
        AttackStateError while the model is perturbed (restore first); fused_adv.sharding.ShardingError
        for layouts it cannot work on (Partial placements, FSDP1 without use_orig_params)."""
        by_inputs = inputs_adv is not None or targets is not None
        if (closure is not None and by_inputs) or (closure is None and (inputs_adv is None or targets is None)):
            raise ValueError("calc_awp: pass inputs_adv and targets (cross-entropy of model(inputs_adv)), or "
                             "closure= (a function of the module returning the loss), not both")
        if self._perturbed is not None:
            raise AttackStateError("AdvWeightPerturb.calc_awp() while the model is perturbed: call restore(diff) "
                                   "first (the direction must be taken at the unperturbed weights)")
        chosen = perturbed_weights(self.model, self._layout)
        if self._ds is not None:
            return self._calc_awp_deepspeed(chosen, inputs_adv, targets, closure)
        if any(self._layout.maybe_sharded(p) for _, p in chosen):
            return self._calc_awp_sharded(chosen, inputs_adv, targets, closure)
        names = [n for n, _ in chosen]
        params = data_of(p for _, p in chosen)
        if self.proxy is not None:
            proxy_params = self._proxy_step(names, inputs_adv, targets, closure, "")
            with torch.no_grad():
                dirs = list(torch._foreach_sub([proxy_params[n].detach() for n in names], params))
            scale = 1.0
        else:
            live = [(n, p) for n, p in chosen if p.requires_grad]
            was_training = self.model.training
            self.model.train()
            try:
                loss = self._loss(self.model, inputs_adv, targets, closure)
            finally:
                self.model.train(was_training)
            grads = torch.autograd.grad(loss, [p for _, p in live], allow_unused=True)
            # a weight the loss does not reach (or a frozen one) has Delta = 0: diff 0, left out
            kept = [(n, p, g) for (n, p), g in zip(live, grads) if g is not None]
            names = [n for n, _, _ in kept]
            params = data_of(p for _, p, _ in kept)
            dirs = [g if g.is_contiguous() else g.contiguous() for _, _, g in kept]
            scale = float(self.proxy_lr)
        stats = ops.multi_tensor_sumsq(params + dirs, backend=self.backend)
        n = len(params)
        return AWPDiff(self, names, params, dirs, stats[:n], stats[n:], scale)

    def _proxy_step(self, names, inputs_adv, targets, closure, layout_hint: str) -> dict:
        """The paper's proxy step: proxy <- model's state, one proxy_optim step on the negated
        loss; returns the proxy's parameters by name (ValueError if one of ``names`` is missing)."""
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss = -self._loss(self.proxy, inputs_adv, targets, closure)
        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()
        proxy_params = dict(self.proxy.named_parameters())
        missing = [n for n in names if n not in proxy_params]
        if missing:
            raise ValueError(f"calc_awp: the proxy has no parameter named {missing[0]!r}; the proxy must be "
                             f"the model's architecture{layout_hint}")
        return proxy_params

    def _calc_awp_sharded(self, chosen, inputs_adv, targets, closure) -> AWPDiff:
        """calc_awp on sharded parameters (FSDP2 / HSDP / TP DTensors, FSDP1 use_orig_params=True):
        the directions and the statistics on this rank's pieces, ||W||^2 and ||D||^2 summed over
        the ranks that share each tensor with one all_reduce per process group (no host sync).
        Without a proxy the gradient is taken with ``backward()``: FSDP gathers the weights
        outside autograd and hands the gradients to the sharded parameters in its own
        post-backward hooks, so ``torch.autograd.grad`` cannot reach them; the model's ``.grad``
        is set aside for it and put back afterwards (under FSDP1 copies of the gradient pieces,
        because FSDP1 writes the original parameters' gradients back into its flat gradient in
        place)."""
        names = [n for n, _ in chosen]
        objs = [p for _, p in chosen]
        if self.proxy is not None:
            proxy_params = self._proxy_step(names, inputs_adv, targets, closure, ", sharded the same way")
            with torch.no_grad():
                dirs = [proxy_params[n].detach() - p.detach() for n, p in chosen]
            scale = 1.0
        else:
            every = list(self.model.parameters())
            saved = [None if p.grad is None else (p.grad.detach().clone() if _fsdp1_param(p) else p.grad)
                     for p in every]
            was_training = self.model.training
            self.model.train()
            try:
                for p in every:
                    p.grad = None
                self._loss(self.model, inputs_adv, targets, closure).backward()
                dirs = [None if not p.requires_grad or p.grad is None
                        else (p.grad.detach().clone() if _fsdp1_param(p) else p.grad.detach())
                        for p in objs]
            finally:
                self.model.train(was_training)
                for p, g in zip(every, saved):
                    p.grad = g
            scale = float(self.proxy_lr)
        loc = self._layout.localize(objs, dirs, names=names)
        params = loc.params
        dirs = [d if d.is_contiguous() else d.contiguous() for d in loc.grads]
        n = len(params)
        stats = loc.reduce(ops.multi_tensor_sumsq(params + dirs, backend=self.backend).view(2, n), dim=1)
        return AWPDiff(self, [names[i] for i in loc.live], params, dirs, stats[0], stats[1], scale)

    def _calc_awp_deepspeed(self, chosen, inputs_adv, targets, closure) -> AWPDiff:
        """calc_awp (proxy=None) on a model inside a DeepSpeed engine, ZeRO-0 to 3: the gradient of
        the loss over the GLOBAL batch comes from ``engine.backward`` (autograd.grad would give this
        rank's batch only), read where ZeRO keeps it (:meth:`fused_adv.sharding_deepspeed.
        DeepSpeedLayout.localize`) and copied; the engine's gradients are then emptied and any
        that it held before are put back (ZeRO-0: ``.grad`` set aside and put back; ZeRO-1/2/3:
        copied by the GradStore and added back), so the training backward that follows starts
        from them whether the stage adds or replaces.  Statistics: one all_reduce per phase at
        ZeRO-3 (partitions), none at ZeRO-1/2 (the rebuilt gradients are whole)."""
        ds = self._ds
        names = [n for n, _ in chosen]
        objs = [p for _, p in chosen]
        backward = ds.engine.backward if ds.engine is not None else (lambda loss: loss.backward())
        every = [p for p in ds.module.parameters()]
        saved = None
        if ds.stage == 0:
            saved = [p.grad for p in every]
            for p in every:
                p.grad = None
        elif ds.has_grads():
            saved = ds.store.copy()
            ds.store.zero()
        was_training = self.model.training
        self.model.train()
        try:
            backward(self._loss(self.model, inputs_adv, targets, closure))
            loc = ds.localize(objs, names=names)
            dirs = [g.detach().clone(memory_format=torch.contiguous_format) for g in loc.grads]
        finally:
            self.model.train(was_training)
            if ds.stage == 0:
                for p, g in zip(every, saved):
                    p.grad = g
            else:
                ds.store.zero()
                if saved is not None:
                    ds.store.add(saved)
        params = loc.params
        n = len(params)
        stats = loc.reduce(ops.multi_tensor_sumsq(params + dirs, backend=self.backend).view(2, n), dim=1)
        diff = AWPDiff(self, [names[i] for i in loc.live], params, dirs, stats[0], stats[1], float(self.proxy_lr))
        diff._objs = [objs[i] for i in loc.live]
        return diff

    def _engine_rebuilt_weights(self) -> bool:
        """DeepSpeed: True when an engine.step() that was not skipped ran since perturb() AND the
        engine steps a master copy (ZeRO-1/2/3, or fp16/bf16): it then rewrote the weights from
        its unperturbed master, so they hold no perturbation to take back."""
        ds = self._ds
        if ds is None or self._steps_at_perturb is None or ds.engine is None:
            return False
        eng = ds.engine
        master = ds.stage > 0 or eng.fp16_enabled() or eng.bfloat16_enabled()
        g0, s0 = self._steps_at_perturb
        return master and (eng.global_steps - g0) > (eng.skipped_steps - s0)

    # ------------------------------------------------------------------ perturb / restore
    def _apply(self, diff, coeff: float) -> None:
        if isinstance(diff, AWPDiff):
            if diff.owner is not self:
                raise ValueError("AdvWeightPerturb: this diff was computed by another AdvWeightPerturb")
            params = diff.params
            if self._ds is not None and self._ds.stage == 3:
                # re-read: a forward since may have gathered copies (released here, no collective)
                params = self._ds.pieces(diff._objs)
            ops.awp_paper_add_(params, diff.dirs, diff.param_sumsq, diff.dir_sumsq, diff.scale, coeff,
                               backend=self.backend)
            return
        if self._ds is not None:
            raise TypeError("AdvWeightPerturb under DeepSpeed: diff must be what calc_awp returns (a plain "
                            "mapping cannot be written into ZeRO's partitions)")
        if not isinstance(diff, Mapping):
            raise TypeError(f"AdvWeightPerturb: diff must be what calc_awp returns (or a mapping name -> tensor), "
                            f"got {type(diff).__name__}")
        named = dict(self.model.named_parameters())
        unknown = [k for k in diff if k not in named]
        if unknown:
            raise ValueError(f"AdvWeightPerturb: diff names {unknown[:3]} are not parameters of the model")
        # a plain mapping (e.g. the reference's diff): the paper's add_into_weights
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in diff:
                    param.add_(coeff * diff[name])

    def perturb(self, diff) -> None:
        """Model weights += gamma * diff, in place (one pass for an :class:`AWPDiff`).  Raises
        AttackStateError when already perturbed (restore first); ValueError / TypeError for a diff
        that is not this object's or names unknown parameters."""
        if self._perturbed is not None:
            raise AttackStateError("AdvWeightPerturb.perturb() twice without restore()")
        self._apply(diff, 1.0 * self.gamma)
        self._perturbed = diff
        if self._ds is not None and self._ds.engine is not None:
            self._steps_at_perturb = (self._ds.engine.global_steps, self._ds.engine.skipped_steps)

    def restore(self, diff=None) -> None:
        """Model weights -= gamma * diff (call it after the optimizer step, as the paper does; the
        result is the stepped weights less the perturbation, not bit-exact by design).  ``diff``
        defaults to the one perturbed with.  Under DeepSpeed (built with the engine) after an
        ``engine.step()`` that stepped a master copy (ZeRO-1/2/3, fp16/bf16), the weights already
        are master - update, written by the step from the unperturbed master: nothing is subtracted
        (the paper's (w + v) - update - v is the same weights); before the step, or at ZeRO-0 fp32,
        the perturbation is subtracted.  Raises AttackStateError without a prior perturb and
        ValueError for a diff other than the one perturbed with."""
        if self._perturbed is None:
            raise AttackStateError("AdvWeightPerturb.restore() without a prior perturb()")
        if diff is not None and diff is not self._perturbed:
            raise ValueError("AdvWeightPerturb.restore(diff): not the diff the model was perturbed with")
        diff = self._perturbed
        if not self._engine_rebuilt_weights():
            self._apply(diff, -1.0 * self.gamma)
        # else (DeepSpeed, after engine.step): the step wrote master - update into the weights; the
        # paper's (w + v) - update - v is that same w - update (SGD / Adam without weight decay).
        self._perturbed = None
        self._steps_at_perturb = None

    @contextlib.contextmanager
    def perturbed(self, diff):
        """``perturb(diff)`` on entry, ``restore(diff)`` on exit, also when the block raises."""
        self.perturb(diff)
        try:
            yield self
        finally:
            self.restore(diff)

    @property
    def is_attacked(self) -> bool:
        """True between perturb and restore."""
        return self._perturbed is not None

    def extra_memory_bytes(self) -> int:
        """Bytes held for the perturbation while perturbed: the directions (one copy of the perturbed
        weights), plus, with a proxy, the proxy's parameters and gradients."""
        held = self._perturbed.nbytes() if isinstance(self._perturbed, AWPDiff) else 0
        if self.proxy is not None:
            for p in self.proxy.parameters():
                held += p.numel() * p.element_size()
                if p.grad is not None:
                    held += p.grad.numel() * p.grad.element_size()
        return held
