"""DeepSpeed ZeRO stages 0-3 for the weight-space methods: local pieces, gradients where ZeRO
keeps them, and the gradient bookkeeping across several ``engine.backward`` calls.

docs/methods.md §12 (Sharded training).  The weight-space methods work on the
:class:`fused_adv.sharding.Localized` view (local pieces of P, their gradients' local pieces, one
collective per reduction phase); this module builds that view for a model inside a DeepSpeed
engine, whose gradients are not in ``param.grad`` (ZeRO-1/2/3 set it to None after
``engine.backward``) and, at ZeRO-3, whose parameters are flat partitions (``param.ds_tensor``).

Per stage (what ``engine.backward`` leaves behind, measured with DeepSpeed 0.19.8):

* ZeRO-0: a plain data-parallel engine.  ``param.grad`` holds the averaged gradient; nothing is
  sharded; the plain path of :func:`fused_adv.sharding.localize` applies.
* ZeRO-1/2: every rank holds the whole parameters (the model's weights are views into one flat
  buffer per group, replicated) but only its partition of the averaged gradient
  (``param._hp_mapping`` gives the fragment and ``optimizer.averaged_gradients`` holds it; ranks
  whose partition misses a parameter hold none of its gradient).  The weights the next forward
  uses are the replicated ones, so every rank must apply the same perturbation to its whole
  copy.  Chosen scheme: ONE all_reduce of a flat buffer that holds the chosen parameters'
  gradients, each rank writing its own fragments and zeros elsewhere (fragments tile a
  parameter exactly once, so the sum IS the full averaged gradient, bit for bit), after which
  every rank runs the identical elementwise step on identical data and gets identical weights;
  restore is a local copy.  (The alternative, perturbing only one's own fragment after an
  all_reduce of the statistics, needs a second collective of the same size to make the
  replicas equal again, and another one at restore.)  The per-tensor statistics then need no
  reduction.
* ZeRO-3: ``param.data`` is empty outside forward; ``param.ds_tensor`` is this rank's flat
  partition (the last rank's is padded; only its first ``ds_numel - rank * partition_numel``
  elements are real) and the next forward all-gathers exactly these partitions, so an in-place
  write to ``ds_tensor`` IS the perturbation of the full weight on every rank.  The gradient's
  partition is the matching slice of the optimizer's flat gradient buffer.  Per-tensor
  statistics are sums over ``param.ds_process_group``: one all_reduce per phase for all
  partitioned parameters (the reduction plan of :class:`fused_adv.sharding.Localized`).
  Persistent parameters (``ds_persist``: smaller than ``stage3_param_persistence_threshold``,
  1e5 elements by default) that are gathered at attack time stay gathered until the optimizer
  step re-gathers them, and forwards use that copy: they are treated as at ZeRO-1/2
  (replicated, gradient rebuilt by the one flat all_reduce).  Those not gathered (DeepSpeed
  releases them at the end of backward) are partitioned like the others; a copy that a forward
  gathers between attack and restore is released at restore so that the restored partitions
  are what the next forward reads.

Two ``engine.backward`` calls before one ``engine.step`` (gradient_accumulation_steps=1, so
every backward is an accumulation boundary): ZeRO-0 and ZeRO-3 ADD the second gradient to the
first; ZeRO-1 and ZeRO-2 REPLACE it (the averaged partition is rebuilt from the second
backward alone).  :class:`GradStore` makes every method's bookkeeping independent of this:
the clean gradients are set aside (and the engine's zeroed) by the method and added back after
the adversarial backward (FGM: at ``restore()``; PGD and MI-FGSM: ``backup_grad`` / ``restore()``);
SAM (``SAM.from_engine``) empties them at ``first_step(zero_grad=True)`` so that the step uses the
gradient at w + e(w) alone; the paper's AWP (``AdvWeightPerturb(engine)``) takes its ascent
gradient with ``engine.backward`` between a copy and an add-back of the engine's gradients.  With
gradient_accumulation_steps > 1 at ZeRO-1/2 the gradients of a micro-batch that is not a
boundary are not reduced yet (``averaged_gradients`` is None): the methods raise, as for a
model without gradients.

Refused (:class:`fused_adv.sharding.ShardingError`, naming the stage and what works): ZeRO
offload of parameters or optimizer states (the partitions/gradients live on host or NVMe
buffers that the next forward swaps in), ZeRO-3 parameters caught gathered (inside forward, or
kept by prefetching) that are not persistent, ``restore_mode='swap'`` at ZeRO-1/2/3.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fused_adv.sharding import Localized, ShardingError, _NO_REDUCTION, _Plan

__all__ = ["is_engine", "find_engine_optimizer", "DeepSpeedLayout", "GradStore", "deepspeed_layout"]


def is_engine(obj) -> bool:
    """True when ``obj`` is a ``deepspeed.DeepSpeedEngine`` (checked by class name and the
    attributes used, so that importing this module never imports deepspeed)."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__) and hasattr(obj, "module")


def _zero_optimizer_of(model: nn.Module):
    """The ZeRO optimizer that owns ``model``'s parameters (found from the attributes DeepSpeed
    puts on them), or None.  ZeRO-3 parameters carry ``_z3_optimizer``.  ZeRO-1/2 parameters
    carry only ``_hp_mapping`` (the fragment this rank owns, None elsewhere; its
    ``gradient_dict`` IS the optimizer's ``averaged_gradients``) and ``_dp_group``: then a
    :class:`_Zero12View` of them stands in for the optimizer."""
    mapped = None
    for p in model.parameters():
        opt = getattr(p, "_z3_optimizer", None)
        if opt is not None:
            return opt
        opt = getattr(p, "_zero_optimizer", None)
        if opt is not None:
            return opt
        if mapped is None and getattr(p, "_hp_mapping", None) is not None:
            mapped = p._hp_mapping
    if mapped is None and any(hasattr(p, "_hp_mapping") for p in model.parameters()):
        raise ShardingError("fused_adv: the model is inside a DeepSpeed ZeRO-1/2 engine but this rank's "
                            "partition holds none of its parameters; build the method with the engine")
    return None if mapped is None else _Zero12View(mapped)


class _Zero12View:
    """What the methods need of a ZeRO-1/2 optimizer when only ``engine.module`` was given."""

    def __init__(self, mapping):
        self.averaged_gradients = mapping.gradient_dict
        self.cpu_offload = bool(mapping.use_offload)
        self.partition_gradients = None  # unknown: ZeRO-1 and ZeRO-2 behave alike here


def find_engine_optimizer(model):
    """(module, zero_optimizer or None, stage): ``model`` is a DeepSpeedEngine or a module that
    one wraps (``engine.module``), or any other module (stage None).  Given the module at
    ZeRO-1/2, the stage is reported as 2 (ZeRO-1 and ZeRO-2 behave alike for the methods)."""
    if is_engine(model):
        stage = int(model.zero_optimization_stage())
        opt = model.optimizer if stage > 0 else None
        return model.module, opt, stage
    opt = _zero_optimizer_of(model)
    if opt is None:
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ShardingError(
                "fused_adv: the model's parameters are ZeRO-3 partitioned (ds_id) but no ZeRO optimizer is "
                "attached to them (deepspeed.zero.Init without deepspeed.initialize?): the gradients cannot "
                "be found. Build the method after deepspeed.initialize(model=..., optimizer=...).")
        return model, None, None
    stage = 3 if any(hasattr(p, "ds_id") for p in model.parameters()) else (1 if opt.partition_gradients is False
                                                                           else 2)
    return model, opt, stage


class GradStore:
    """The gradients a ZeRO engine holds for ALL trainable parameters (this rank's pieces), as
    one unit the methods can set aside, zero and add back; what makes FGM's "clean +
    adversarial" and PGD's "clean + last adversarial" hold whether the engine adds a second
    backward to the first (ZeRO-0/3) or replaces it (ZeRO-1/2).

    ``copy()`` returns a copy of the current gradients (this rank's partition: 1/world of the
    model's gradients), ``zero()`` zeroes the engine's, ``add(saved)`` adds a copy back in place.
    ZeRO-1/2/3 only (at ZeRO-0 the gradients are ``param.grad`` and the methods' plain path
    applies)."""

    def __init__(self, layout: "DeepSpeedLayout"):
        self.layout = layout

    def _buffers(self) -> list[Tensor]:
        lay = self.layout
        if lay.stage == 3:
            return [lay.optimizer.grad_partitions_flat_buffer]
        if lay.stage in (1, 2):
            out = []  # the partitions DeepSpeed's optimizer steps with (and get_lp_grad_fragment reads)
            for i in sorted(lay.optimizer.averaged_gradients):
                out.extend(t for t in (lay.optimizer.averaged_gradients[i] or ()) if t is not None)
            return out
        raise ShardingError("fused_adv: GradStore is for ZeRO-1/2/3; at ZeRO-0 the gradients are param.grad")

    @torch.no_grad()
    def copy(self):
        """A copy of the engine's current gradients (what :meth:`add` takes); the engine's are left
        as they are.  Raises ShardingError when the engine holds no gradients."""
        self.layout.require_grads()
        return [b.clone() for b in self._buffers()]

    @torch.no_grad()
    def zero(self) -> None:
        """Zeroes the engine's current gradients (nothing to do when it holds none)."""
        if self.layout.has_grads():
            for b in self._buffers():
                b.zero_()

    @torch.no_grad()
    def add(self, saved) -> None:
        """Adds gradients from :meth:`copy` to the engine's current ones, in place.  Raises
        ShardingError when the engine holds no gradients now (an engine.step in between) or
        its gradient partitions changed layout."""
        self.layout.require_grads()
        bufs = self._buffers()
        if len(bufs) != len(saved) or any(b.shape != s.shape for b, s in zip(bufs, saved)):
            raise ShardingError("fused_adv: the DeepSpeed engine's gradient partitions changed layout between "
                                "setting the clean gradients aside and adding them back")
        for b, s in zip(bufs, saved):
            b.add_(s)


class DeepSpeedLayout:
    """What the methods need from a model inside a DeepSpeed engine (see the module docstring).

    ``DeepSpeedLayout(model)``: ``model`` is the engine or ``engine.module``.  Attributes:
    ``module`` (the nn.Module), ``engine`` (or None when built from the module), ``optimizer``
    (the ZeRO optimizer, None at ZeRO-0), ``stage`` (0-3), ``store`` (a :class:`GradStore`),
    ``accumulates`` (True when a second ``engine.backward`` before ``engine.step`` adds to the
    first: ZeRO-0/3; False at ZeRO-1/2).  Raises ShardingError for ZeRO offload (parameters or
    optimizer states)."""

    def __init__(self, model):
        self.engine = model if is_engine(model) else None
        self.module, self.optimizer, stage = find_engine_optimizer(model)
        if stage is None:
            raise ShardingError("fused_adv: DeepSpeedLayout needs a DeepSpeed engine or a module inside one")
        self.stage = stage
        self.accumulates = stage in (0, 3)
        self.store = GradStore(self)
        opt = self.optimizer
        if opt is not None:
            if getattr(opt, "offload_param", False) or getattr(opt, "offload_optimizer", False) \
                    or getattr(opt, "cpu_offload", False):
                what = "parameters" if getattr(opt, "offload_param", False) else "optimizer states"
                raise ShardingError(
                    f"fused_adv: DeepSpeed ZeRO-{stage} with offload of the {what} is not supported: the "
                    "partitions and gradients live in host/NVMe buffers that the engine swaps, so an in-place "
                    "perturbation is not guaranteed to reach the next forward. Without offload, ZeRO-1, 2 and 3 "
                    "are supported; or drop offload_param/offload_optimizer from the config.")
        self._plan_key = None
        self._plan = None
        self._replicated_ids: set[int] = set()  # ZeRO-3: persistent parameters perturbed in their gathered copy

    # -- gradients present? --------------------------------------------------------------------
    def has_grads(self) -> bool:
        """Whether the engine holds gradients now (after engine.backward, before engine.step).
        Host-side state only, the same on every rank; no collective, no device read."""
        if self.stage == 0:
            return any(p.grad is not None for p in self.module.parameters())
        ag = self.optimizer.averaged_gradients
        return any(v is not None for v in ag.values()) if ag else False

    def require_grads(self) -> None:
        """Raises ShardingError (a ValueError) when :meth:`has_grads` is False."""
        if not self.has_grads():
            raise ShardingError(
                f"fused_adv: the DeepSpeed engine (ZeRO-{self.stage}) holds no gradients now: the attack must "
                "come after engine.backward(loss) and before engine.step()"
                + (" (with gradient_accumulation_steps > 1 at ZeRO-1/2 the gradients of a micro-batch that is "
                   "not an accumulation boundary are not reduced yet: use gradient_accumulation_steps=1, or "
                   "ZeRO-3)" if self.stage in (1, 2) else "") + ".")

    # -- the local view --------------------------------------------------------------------------
    def localize(self, params: Sequence[nn.Parameter], grads=None, *, names: Sequence[str] | None = None,
                 grad_dtype_as_param: bool = True) -> Localized:
        """The :class:`fused_adv.sharding.Localized` view of ``params`` (the same list, in the same
        order, on every rank) with their gradients taken from where the engine keeps them
        (``grads`` is accepted for the interface of :meth:`fused_adv.sharding.ShardingLayout.
        localize` and ignored at ZeRO-1/2/3).

        ZeRO-0: the parameters and ``param.grad``.  ZeRO-1/2 and ZeRO-3 persistent parameters:
        the whole parameters (replicated) and their full averaged gradients rebuilt by ONE
        all_reduce over the data-parallel group (a flat buffer of the chosen parameters' numel, in
        the gradients' dtype).  ZeRO-3 partitioned parameters: the real part of ``ds_tensor`` and
        the matching gradient slice (a view of the engine's buffer), with a plan that sums the
        statistics over ``ds_process_group``.  Gradients whose dtype differs from the
        parameter's (bf16 weights, fp32 accumulation) are converted (a copy) when
        ``grad_dtype_as_param``.  Every rank must call it (it may issue a collective).

        At ZeRO-3 the persistent parameters gathered now are taken whole (forwards use that copy);
        every other gathered copy is released first (:meth:`_release_gathered`) and the partition
        is used.

        Raises ShardingError when the engine holds no gradients (before backward, after step),
        for a ZeRO-3 parameter in use by a module (inside forward / GatheredParameters)."""
        self.require_grads()
        params = list(params)
        if self.stage == 0:
            locals_ = [p.detach() for p in params]
            live = [i for i, p in enumerate(params) if p.grad is not None and p.numel() > 0]
            return Localized(locals=locals_, live=live, params=[locals_[i] for i in live],
                             grads=[params[i].grad for i in live], plan=_NO_REDUCTION)
        n = len(params)
        locals_: list[Tensor] = [None] * n
        grads: list[Tensor | None] = [None] * n
        slot_groups: list[tuple] = [()] * n
        replicated = []  # (index, param, [(lp_start, fragment grad)])
        if self.stage == 3:
            # Persistent parameters gathered now are used from that copy by the next forwards (until
            # the optimizer step re-gathers them): perturb it.  Everything else works on partitions.
            gathered = {id(p) for p in params if getattr(p, "ds_persist", False) and p.data.numel() != 0}
            self._release_gathered(params, names, keep=gathered)
            self._replicated_ids = gathered
        for i, p in enumerate(params):
            label = names[i] if names is not None else f"params[{i}]"
            if self.stage == 3:
                if not hasattr(p, "ds_id"):
                    raise ShardingError(f"fused_adv: {label} is not managed by the ZeRO-3 engine (no ds_id)")
                if p.data.numel() != 0:  # persistent and gathered (kept above): forwards use p.data
                    replicated.append((i, p, self._z3_fragment(p)))
                    continue
                valid = self._z3_valid(p)
                locals_[i] = p.ds_tensor.detach().narrow(0, 0, valid)
                if valid > 0:
                    g = self._z3_grad_buffer(p).narrow(0, 0, valid)
                    grads[i] = g.to(p.ds_tensor.dtype) if grad_dtype_as_param and g.dtype != p.ds_tensor.dtype else g
                slot_groups[i] = (p.ds_process_group,)
            else:
                replicated.append((i, p, self._z12_fragment(p)))
        if replicated:
            full = self._rebuild(replicated)
            for (i, p, _), g in zip(replicated, full):
                locals_[i] = p.detach()
                grads[i] = g.to(p.dtype) if grad_dtype_as_param and g.dtype != p.dtype else g
        live = [i for i in range(n) if grads[i] is not None and locals_[i].numel() > 0]
        if not any(slot_groups):
            plan = _NO_REDUCTION
        else:
            device = params[0].ds_tensor.device if self.stage == 3 else params[0].device
            key = (n, tuple(live), tuple(tuple(id(g) for g in gs) for gs in slot_groups), device)
            if key != self._plan_key:
                self._plan = _Plan.build(n, live, slot_groups, device)
                self._plan_key = key
            plan = self._plan
        return Localized(locals=locals_, live=live, params=[locals_[i] for i in live],
                         grads=[grads[i] for i in live], plan=plan)

    def pieces(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        """What :meth:`localize` gave as ``locals`` for ``params``, read again now (restore writes the
        backups into these): ZeRO-3 partitioned parameters: the real part of ``ds_tensor``;
        gathered persistent ones and ZeRO-1/2 parameters: the whole weight.  No collective.
        Raises ShardingError for a ZeRO-3 parameter in use by a module right now."""
        if self.stage != 3:
            return [p.detach() for p in params]
        # A forward between attack and restore may have gathered weights that were perturbed in
        # their partitions (a forward under torch.no_grad, or a persistent parameter, keeps them
        # gathered): release those copies (no collective) so that restore writes the partitions
        # and the next forward gathers the restored values.
        self._release_gathered(params, None, keep=self._replicated_ids)
        return [p.detach() if id(p) in self._replicated_ids else p.ds_tensor.detach().narrow(0, 0, self._z3_valid(p))
                for p in params]

    @staticmethod
    def _release_gathered(params, names, keep: set[int]) -> None:
        """Releases the ZeRO-3 parameters among ``params`` that are gathered now, except those whose
        id is in ``keep`` (no collective: the partitions already hold the values).  Between
        backward and forward a gathered copy is a leftover (a forward under ``torch.no_grad``
        does not release; a persistent parameter stays gathered until the optimizer step), and a
        write to it would not reach the partitions the next gather reads, or would outlive a
        restore of the partitions.  One in use by a module (inside forward /
        ``GatheredParameters``) or in flight is refused with ShardingError."""
        stale = []
        for i, p in enumerate(params):
            if id(p) in keep or p.data.numel() == 0:
                continue
            if p.ds_active_sub_modules or str(p.ds_status).endswith("INFLIGHT"):
                label = names[i] if names is not None else f"params[{i}]"
                raise ShardingError(
                    f"fused_adv: ZeRO-3 parameter {label} is gathered and in use right now (status {p.ds_status}): "
                    "a write to it would be dropped at its release. Attack after engine.backward(loss), outside "
                    "forward and outside deepspeed.zero.GatheredParameters.")
            stale.append(p)
        if stale:
            stale[0].partition(param_list=stale)

    # -- ZeRO-1/2 ------------------------------------------------------------------------------
    def _z12_fragment(self, p) -> list[tuple[int, Tensor]]:
        """[(start in the flattened parameter, this rank's gradient fragment)] (empty when this
        rank's partition misses p)."""
        if not hasattr(p, "_hp_mapping"):
            raise ShardingError(f"fused_adv: a parameter of shape {tuple(p.shape)} is not in the ZeRO-{self.stage} "
                                "optimizer's parameter groups (frozen when the engine was built?)")
        mapping = p._hp_mapping
        if mapping is None:
            return []
        addr = mapping.lp_fragment_address
        frag = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        if frag.numel() == p.numel() and addr.numel != p.numel():
            # bf16 optimizer keeps a full accumulation buffer: only the owned fragment counts.
            frag = frag.narrow(0, addr.start, addr.numel)
        return [(addr.start, frag)]

    # -- ZeRO-3 ---------------------------------------------------------------------------------
    @staticmethod
    def _z3_valid(p) -> int:
        part = p.ds_tensor.numel()
        rank = dist.get_rank(group=p.ds_process_group)
        return max(0, min(part, p.ds_numel - rank * part))

    def _z3_grad_buffer(self, p) -> Tensor:
        table = getattr(self.optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
        if table is not None and p.ds_id in table:
            return table[p.ds_id]
        return self.optimizer._get_fp32_grad_state_partition(p, release_swap_buffers=False)[0]

    def _z3_fragment(self, p) -> list[tuple[int, Tensor]]:
        valid = self._z3_valid(p)
        if valid == 0:
            return []
        rank = dist.get_rank(group=p.ds_process_group)
        return [(rank * p.ds_tensor.numel(), self._z3_grad_buffer(p).narrow(0, 0, valid))]

    # -- the one collective that rebuilds replicated parameters' gradients ------------------------
    def _rebuild(self, replicated) -> list[Tensor]:
        """Full averaged gradients of replicated parameters (ZeRO-1/2, ZeRO-3 persistent): one flat
        buffer, each rank's fragments written in place, zeros elsewhere, ONE all_reduce (SUM)."""
        dtype = None
        for _, _, frags in replicated:
            for _, g in frags:
                dtype = g.dtype
                break
            if dtype is not None:
                break
        if dtype is None:  # this rank holds none of them: the engine accumulates in fp32 (fp32/bf16) or fp16
            dtype = self._grad_dtype()
        device = replicated[0][1].device if self.stage != 3 else replicated[0][1].ds_tensor.device
        total = sum(p.numel() if self.stage != 3 else p.ds_numel for _, p, _ in replicated)
        flat = torch.zeros(total, dtype=dtype, device=device)
        views, off = [], 0
        for _, p, frags in replicated:
            numel = p.numel() if self.stage != 3 else p.ds_numel
            view = flat.narrow(0, off, numel)
            for start, g in frags:
                view.narrow(0, start, g.numel()).copy_(g)
            views.append(view.view(p.ds_shape if self.stage == 3 else p.shape))
            off += numel
        group = replicated[0][1].ds_process_group if self.stage == 3 else replicated[0][1]._dp_group
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        return views

    def _grad_dtype(self) -> torch.dtype:
        opt = self.optimizer
        if self.stage == 3:
            return opt.grad_partitions_flat_buffer.dtype
        for i in sorted(opt.averaged_gradients):
            for t in opt.averaged_gradients[i] or ():
                if t is not None:
                    return t.dtype
        return getattr(opt, "gradient_accumulation_dtype", torch.float32)


def deepspeed_layout(model) -> DeepSpeedLayout | None:
    """A :class:`DeepSpeedLayout` when ``model`` is a DeepSpeed engine or a module inside one,
    else None (a plain model: the methods use :mod:`fused_adv.sharding`)."""
    if is_engine(model) or _zero_optimizer_of(model) is not None or any(
            hasattr(p, "ds_id") for p in model.parameters()):
        return DeepSpeedLayout(model)
    return None
