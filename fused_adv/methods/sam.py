"""Fused drop-in SAM / ASAM, davda54/sam's class on the multi-tensor kernels (docs/methods.md §11 (SAM)).

first_step: ONE multi-tensor reduction (the per-tensor sums of ((|P| if adaptive else 1)*G)^2 of
every parameter with a gradient, one launch) and ONE pass that writes the backup and the perturbed
weight, with the global norm combined on the device inside that pass (no host sync, no per-tensor
``clone()``: the backups are allocated once and reused).  second_step: one bit-exact multi-tensor
restore, then the base optimizer's step.  Parameter groups with different ``rho`` / ``adaptive``
cost one extra launch per change of setting along the group list.

GradScaler (docs/methods.md §11 (SAM), "AMP"): first_step may read the SCALED gradients -- the
direction G/||G|| is scale-invariant and rho/(s*n + 1e-12) undoes a scale s up to the 1e-12 --
and a non-finite clean gradient (the scaler's overflow case) skips the climb on the device; the
second gradient goes through the scaler: ``second_step(scaler=scaler)`` restores, then calls
``scaler.step(self.base_optimizer)``.
"""
from __future__ import annotations

import torch

from fused_adv import ops
from fused_adv.methods._common import AttackStateError
from fused_adv.sharding import ShardingError, ShardingLayout
from fused_adv.sharding_deepspeed import DeepSpeedLayout, is_engine


class SAM(torch.optim.Optimizer):
    """``SAM(params, base_optimizer, rho=0.05, adaptive=False, *, backend='auto', **kwargs)``:
    the same constructor, methods and numbers as davda54's class (``fused_adv.reference.SAM``).

    Args:
        params: parameters or param-group dicts (a group may set its own ``rho`` / ``adaptive``).
        base_optimizer: the optimizer CLASS; built as ``base_optimizer(self.param_groups,
            **kwargs)``, it shares SAM's param groups (``self.param_groups is
            self.base_optimizer.param_groups``).
        rho: neighbourhood radius (>= 0).  adaptive: ASAM (scale by |P|).
        backend: 'auto' | 'cuda' | 'triton' | 'cpp' | 'torch' for the kernels.
        model: only for FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``): the wrapped
            model, where the parameters' flat shards are found.  DTensor parameters (FSDP2,
            HSDP, tensor parallel) need nothing: the climb runs on the local shards and the one
            global norm sums every tensor's reduced sum of squares (one all_reduce per process
            group, no host sync; docs/methods.md §12 (Sharded training)).
        kwargs: the base optimizer's arguments (also SAM's defaults, as in the original).

    Every parameter with a gradient takes part; all of them must live on one device (the global
    norm is combined there) and be contiguous.  Backups are kept in ``state[p]["old_p"]`` (as the
    original), allocated once per parameter and reused.

    Raises ValueError for a negative rho, TypeError when ``base_optimizer`` is an optimizer
    instance instead of its class.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 backend: str = "auto", model: torch.nn.Module | None = None, **kwargs):
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise TypeError("SAM(params, base_optimizer, ...): base_optimizer must be the optimizer CLASS "
                            f"(e.g. torch.optim.SGD) plus its kwargs, got {type(base_optimizer).__name__} "
                            "instance; SAM builds it on its own param groups")
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)

        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.backend = backend
        _refuse_engine(model)
        self._layout = ShardingLayout(model)
        self._engine = None  # DeepSpeed: see from_engine
        self._perturbed: tuple | None = None  # (pieces, backups, parameters)

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False, *,
                       backend: str = "auto", model: torch.nn.Module | None = None) -> "SAM":
        """SAM around an optimizer that already exists (a Trainer's, a scheduler's target): it
        becomes ``base_optimizer`` and SAM shares its param groups, adding ``rho`` / ``adaptive``
        to the groups that lack them (a group's own values win).  The optimizer, its state and its
        schedulers are untouched.  Raises TypeError for a non-optimizer, ValueError for rho < 0."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"SAM.from_optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        self = cls.__new__(cls)
        # Optimizer.__init__ puts the defaults into the given group dicts in place (setdefault) and
        # keeps those same dicts, which is how the original shares groups with its base optimizer.
        torch.optim.Optimizer.__init__(self, optimizer.param_groups, dict(rho=rho, adaptive=adaptive))
        self.base_optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults.update(optimizer.defaults)
        self.backend = backend
        _refuse_engine(model)
        self._layout = ShardingLayout(model)
        self._engine = None
        self._perturbed = None
        return self

    @classmethod
    def from_engine(cls, engine, rho: float = 0.05, adaptive: bool = False, *, backend: str = "auto") -> "SAM":
        """SAM for a model trained by a DeepSpeed engine (ZeRO stages 0-3; docs/methods.md §12
        (Sharded training)).  One param group: every trainable parameter of ``engine.module``
        (with ``rho`` / ``adaptive``); the base step is ``engine.step()`` (the engine's own
        optimizer, fp32 master and loss scaling).  Loop::

            engine.backward(engine(**batch).loss)
            sam.first_step(zero_grad=True)        # climbs; empties ZeRO's gradient buffers
            engine.backward(engine(**batch).loss) # the gradient at w + e(w), alone
            sam.second_step()                     # restores w bit for bit, then engine.step()

        The climb reads the gradients where ZeRO keeps them (ZeRO-1/2: full gradients rebuilt
        by one all_reduce; ZeRO-3: the ds_tensor partitions, the per-tensor sums of squares
        reduced with one all_reduce) and writes the weights the next forward uses on every
        rank.  Raises TypeError when ``engine`` is not a DeepSpeed engine, ValueError for
        rho < 0, fused_adv.sharding.ShardingError for ZeRO offload."""
        if not is_engine(engine):
            raise TypeError(f"SAM.from_engine: expected a deepspeed.DeepSpeedEngine, got {type(engine).__name__}")
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        self = cls.__new__(cls)
        params = [p for p in engine.module.parameters() if p.requires_grad]
        torch.optim.Optimizer.__init__(self, [{"params": params}], dict(rho=rho, adaptive=adaptive))
        self.base_optimizer = engine.optimizer
        self.backend = backend
        self._engine = engine
        self._layout = DeepSpeedLayout(engine)
        self._perturbed = None
        return self

    # -- the two steps --------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climbs to w + e(w): per parameter with a gradient, B <- P and
        P <- P + (P^2 if adaptive else 1) * G * rho / (||(|P| if adaptive else 1) * G|| + 1e-12),
        the norm global over every parameter with a gradient (each group's own rho and adaptive).
        A non-finite norm (inf/NaN gradient, e.g. a GradScaler overflow) leaves P unchanged,
        decided on the device.  Then ``zero_grad()`` if asked.

        Mutates the parameters and their backups in place; reads no value back to the host.
        Raises AttackStateError when the weights are already perturbed (first_step twice),
        ValueError for parameters on several devices, non-contiguous parameters or negative rho,
        TypeError for sparse gradients."""
        if self._perturbed is not None:
            raise AttackStateError("SAM.first_step() called twice without second_step(): the weights are "
                                   "already at w + e(w); call second_step() (or restore()) first")
        ds = self._layout if isinstance(self._layout, DeepSpeedLayout) else None
        if ds is not None and not zero_grad and not ds.accumulates:
            raise ShardingError(
                f"SAM.first_step(zero_grad=False) under DeepSpeed ZeRO-{ds.stage}: the next engine.backward REPLACES "
                "the gradients at this stage instead of adding to them, so the step would not see the sum of both "
                "gradients that zero_grad=False asks for; use first_step(zero_grad=True) (the SAM recipe), or "
                "ZeRO-0 / ZeRO-3, where engine.backward adds")
        # Every rank lists the same slots (a rank holding none of a parameter has no .grad for it
        # under FSDP1); localize keeps the live local pieces, in slot order.
        slots, slot_grads, settings = [], [], []
        for group in self.param_groups:
            rho, adaptive = group["rho"], bool(group["adaptive"])
            if not rho >= 0:
                raise ValueError(f"SAM: param group rho must be >= 0, got {rho}")
            for p in group["params"]:
                if ds is not None:  # ZeRO keeps the gradients: every rank lists every trainable slot
                    if not p.requires_grad:
                        continue
                elif p.grad is None and not self._layout.maybe_sharded(p):
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError("SAM does not support sparse gradients (nn.Embedding(sparse=True))")
                slots.append(p)
                slot_grads.append(p.grad)
                settings.append((rho, adaptive))
        loc = self._layout.localize(slots, slot_grads)
        params, grads = loc.params, loc.grads
        runs = []  # [start, end, rho, adaptive] over the live pieces
        for k, i in enumerate(loc.live):
            rho, adaptive = settings[i]
            if runs and runs[-1][2] == rho and runs[-1][3] == adaptive:
                runs[-1][1] += 1
            else:
                runs.append([k, k + 1, rho, adaptive])
        backups = [self._backup_of(slots[i], like=params[k]) for k, i in enumerate(loc.live)]
        if not params and not loc.sharded:
            raise ValueError("SAM.first_step(): no parameter has a gradient; call backward() first (under "
                             "DeepSpeed ZeRO the gradients are kept by the engine: build SAM.from_engine(engine))")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"SAM (fused): parameters on several devices {sorted(map(str, devices))}; the one "
                             "global norm is combined on one device. Use fused_adv.reference.SAM for model "
                             "parallelism")
        # One reduction per run of groups with the same `adaptive` (one in the usual model).
        sums, start = [], 0
        for i, (a, b, _rho, adaptive) in enumerate(runs):
            if i + 1 < len(runs) and runs[i + 1][3] == adaptive:
                continue
            sums.append(ops.sam_sumsq(params[start:b], grads[start:b], adaptive, backend=self.backend))
            start = b
        if not sums:  # a rank holding no live piece still joins the collective
            sums.append(torch.empty(0, dtype=torch.float32, device=loc.plan.device))
        grad_sumsq = sums[0] if len(sums) == 1 else torch.cat(sums)
        if loc.sharded:
            # Every tensor's sum reduced over the ranks that share it, one entry per slot: the op
            # sums the vector, so tensors held only by other ranks count, replicated ones once.
            grad_sumsq = loc.reduce(grad_sumsq, slots=True)
        for a, b, rho, adaptive in runs:
            ops.sam_perturb_(params[a:b], grads[a:b], backups[a:b], grad_sumsq, rho, adaptive,
                             backend=self.backend)
        self._perturbed = (params, backups, [slots[i] for i in loc.live])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler=None) -> None:
        """Restores w (bit-exact) and takes the base optimizer's step with the current gradients
        (those of the second forward/backward, at w + e(w)): ``self.base_optimizer.step()``, or
        with a GradScaler ``scaler.step(self.base_optimizer)`` (it unscales unless you already
        called ``scaler.unscale_(sam.base_optimizer)`` for clipping, and skips the step on
        inf/NaN; call ``scaler.update()`` afterwards).  Then ``zero_grad()`` if asked.

        Raises AttackStateError without a prior first_step (nothing to restore)."""
        if self._perturbed is None:
            raise AttackStateError("SAM.second_step() called without first_step(): the weights are not "
                                   "perturbed, so there is nothing to restore")
        if self._engine is not None and scaler is not None:
            raise ValueError("SAM.second_step(scaler=...) under DeepSpeed: the engine scales the loss itself "
                             "(fp16 config); call second_step() without a scaler")
        self.restore()
        if self._engine is not None:
            self._engine.step()
        elif scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Puts w back (bit-exact, one multi-tensor copy) without stepping: for loops that step
        the base optimizer themselves.  Raises AttackStateError when nothing is perturbed."""
        if self._perturbed is None:
            raise AttackStateError("SAM.restore() called without first_step()")
        params, backups, objs = self._perturbed
        if isinstance(self._layout, DeepSpeedLayout):
            # re-read (ZeRO-3: a forward may have gathered copies since; releases them so the
            # restored partitions are what the next forward gathers)
            params = self._layout.pieces(objs)
        if params:  # a rank holding no live piece under sharding has nothing to copy
            ops.restore_(params, backups, backend=self.backend)
        self._perturbed = None

    @property
    def is_perturbed(self) -> bool:
        """True between first_step and second_step / restore."""
        return self._perturbed is not None

    @torch.no_grad()
    def step(self, closure=None):
        """first_step(zero_grad=True), ``closure()`` (under enable_grad: a full forward/backward
        at w + e(w)), second_step().  Returns None, as the original.  If the closure raises, the
        weights are restored before the exception propagates (nothing is left perturbed and the
        base optimizer does not step).  Raises TypeError without a closure."""
        if closure is None:
            raise TypeError("Sharpness Aware Minimization requires closure, but it was not provided "
                            "(or call first_step() / second_step() yourself)")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim.Optimizer's; for SAM.from_engine also the engine's gradients (ZeRO-1/2/3
        keep them in their own buffers, which ``engine.zero_grad()`` does not empty)."""
        super().zero_grad(set_to_none=set_to_none)
        ds = self._layout if isinstance(self._layout, DeepSpeedLayout) else None
        if ds is not None:
            if ds.stage == 0:
                self._engine.zero_grad()
            else:
                ds.store.zero()

    def load_state_dict(self, state_dict):
        """As torch.optim.Optimizer's, then re-shares the param groups with the base optimizer.
        Raises AttackStateError while the weights are perturbed."""
        if self._perturbed is not None:
            raise AttackStateError("SAM.load_state_dict() while the weights are perturbed; call second_step() "
                                   "or restore() first")
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups

    # -- internals ---------------------------------------------------------------------------
    def _backup_of(self, p: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """state[p]["old_p"], allocated once (contiguous, p's shape/dtype/device, or those of
        ``like``, p's local shard) and reused."""
        st = self.state[p]
        b = st.get("old_p")
        t = p if like is None else like
        if (b is None or b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
                or not b.is_contiguous()):
            b = torch.empty_like(t, memory_format=torch.contiguous_format).detach()
            st["old_p"] = b
        return b


def _refuse_engine(model) -> None:
    """SAM(..., model=engine) would climb on parameters whose gradients ZeRO keeps elsewhere."""
    if model is not None and (is_engine(model) or any(
            hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in model.parameters())):
        raise ValueError("SAM(model=<DeepSpeed engine or its module>): build it with SAM.from_engine(engine, rho, "
                         "adaptive); its base step is engine.step()")
