"""Sharded parameters for the weight-space methods: local shards and one collective per phase.

docs/methods.md §12 (Sharded training): a method's numbers do not depend on how the parameters
are laid out.  Every per-tensor statistic (||G||^2, ||P||^2, <P-B, G>, ||G||_1, max) is the
reduction (sum, or max) of the pieces' partial results over the ranks that share the tensor, and
every elementwise step runs on the local piece.  This module turns a list of parameters, whatever
their layout, into

* the local pieces (tensors that share storage with the real shard, so the in-place kernels of
  fused_adv.ops mutate the parameter itself) and their gradients' local pieces, and
* a reduction plan: :meth:`Localized.reduce` takes the [L] / [L, k] statistics the multi-tensor
  ops computed over the local pieces and returns them reduced over the process groups that
  shard each tensor, with ONE ``torch.distributed.all_reduce`` per process group per call (the
  statistics of all tensors sharded over the same group are stacked in one buffer), none for
  tensors that are replicated, and no host sync (no ``.item()``, no branching on values).

Layouts understood:

* plain tensors (single process, DDP): replicated, nothing to reduce;
* DTensor parameters (FSDP2 ``fully_shard``: Shard(0) on a 1-D mesh; HSDP: (Replicate,
  Shard(0)) on a 2-D mesh; tensor parallel: Shard(d) / Replicate; FSDP2 + TP: _StridedShard):
  the local piece is ``to_local()``; a tensor sharded over several mesh dimensions is reduced
  over each of them in turn (sum and max are associative), so the number of collectives per
  call is the number of distinct mesh-dimension process groups that shard something;
* FSDP1 ``FullyShardedDataParallel(use_orig_params=True)``: outside forward/backward each
  original parameter is a 1-D view into this rank's piece of its FlatParameter (size 0 on ranks
  holding none of it; ``.grad`` is None there).  The local piece is cut from
  ``flat_param._local_shard`` itself (the FlatParameter's ``_shard_param_infos`` give offset
  and length), the storage those views share and the next all-gather reads, so it is right in
  every state of the unit (under SHARD_GRAD_OP the original parameters point into the gathered
  copy between forward and backward: a restore there still lands in the shard).  The process
  group is the unit's (the intra-node group under HYBRID_SHARD); NO_SHARD is replicated.
  ``use_orig_params=False`` exposes only ``_flat_param`` tensors that mix many parameters:
  refused with :class:`ShardingError`.

Where the perturbation is applied under FSDP1 (and FSDP2): on the local shard, between the
clean backward and the adversarial forward.  At that point FSDP has resharded (the original
parameters are views into ``flat_param._local_shard``, FSDP2's DTensor local tensors are views
into the sharded parameter), and the next forward all-gathers exactly those shards (casting them
afresh under mixed precision), so an in-place write to a shard IS the perturbation of the full
weight every rank computes with.  The alternative, ``summon_full_params(writeback=True)``, would
gather the whole weight on every rank (full-size memory), write it back (two extra collectives
of the full weights) and still need a backup of the full tensor; on shards the backup is
local-shard sized and restore is a local copy.  The update needs only the reduced per-tensor
statistics, which is what this module provides.  Re-pointing ``param.data``
(``restore_mode="swap"``) would detach the parameter from FSDP's flat storage or replace a
DTensor's local tensor: methods must refuse it when :attr:`Localized.sharded` is true.

Rank consistency: every rank must pass the same parameters in the same order (the selection by
name is the same on every rank; do NOT drop parameters whose ``.grad`` is None before calling:
under FSDP1 ``.grad`` is None on ranks that hold none of the parameter, so pass ``None`` in
``grads`` and let :func:`localize` leave the piece out locally while keeping its slot).
"""
from __future__ import annotations

import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ShardingError", "Localized", "ShardingLayout", "localize", "check_model"]


class ShardingError(ValueError):
    """A parameter layout the weight-space methods cannot work on; the message says what to change."""


_DTENSOR = []  # [DTensor class or None], resolved on first use


def _dtensor_cls():
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def _is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _fsdp1_modules(model: nn.Module):
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel
    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def _fsdp2_present(model: nn.Module) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def check_model(model: nn.Module) -> None:
    """Raises ShardingError if ``model`` contains FSDP1 units built with ``use_orig_params=False``
    (their parameters are flat ``_flat_param`` tensors mixing many weights: a name selection
    such as 'word_embeddings' cannot address one of them)."""
    for m in _fsdp1_modules(model):
        handle = getattr(m, "_handle", None)
        if handle is not None and not handle._use_orig_params:
            raise ShardingError(
                "fused_adv: the model is wrapped in FullyShardedDataParallel(use_orig_params=False): its "
                "parameters are flattened into '_flat_param' tensors that mix many weights, so a method "
                "cannot select or perturb one weight. Wrap it with FullyShardedDataParallel(..., "
                "use_orig_params=True) (accelerate: fsdp_use_orig_params: true; HF TrainingArguments: "
                "fsdp_config={'use_orig_params': True}), or use FSDP2 (torch.distributed.fsdp.fully_shard).")


@dataclass
class _Fsdp1Info:
    group: object            # ProcessGroup, or None when the unit does not shard (NO_SHARD)
    flat: object             # the FlatParameter the parameter lives in
    offset: int              # where this rank's piece starts in flat._local_shard
    numel_in_shard: int      # numel of this rank's piece (0 when not in this rank's shard)
    shape: tuple = ()        # the original (unsharded) shape

    def piece(self) -> Tensor:
        """This rank's piece, cut from the FlatParameter's local shard itself: the storage the
        next all-gather reads, whatever state the unit is in (the original parameter's
        ``.data`` is that same view only while the unit is sharded; between forward and backward
        under SHARD_GRAD_OP it is a view into the gathered copy)."""
        shard = self.flat._local_shard
        return shard[self.offset:self.offset + self.numel_in_shard].detach()


class ShardingLayout:
    """What :func:`localize` needs to know about a model beyond its parameters: the FSDP1 units
    (which FlatParameter each original parameter lives in, its process group, this rank's
    piece) and whether FSDP2 wraps part of it.  Build once per model (e.g. lazily in a method,
    on its first attack); it rescans when it meets an FSDP1 parameter it does not know, and looks
    for FSDP2 again when it meets a DTensor parameter (the model was wrapped after the layout
    was built).

    Raises ShardingError for FSDP1 with ``use_orig_params=False`` (see :func:`check_model`)."""

    def __init__(self, model: nn.Module | None = None):
        self._model = None if model is None else weakref.ref(model)
        self._fsdp1: dict[int, _Fsdp1Info] = {}
        self._fsdp2 = False
        self._plans: dict = {}  # key -> _Plan; a handful of live patterns per method (see localize)
        self.refresh()

    def refresh(self) -> None:
        model = None if self._model is None else self._model()
        self._fsdp1 = {}
        self._fsdp2 = False
        if model is None:
            return
        check_model(model)
        self._fsdp2 = _fsdp2_present(model)
        for m in _fsdp1_modules(model):
            handle = getattr(m, "_handle", None)
            if handle is None:  # a unit that owns no parameters
                continue
            flat = handle.flat_param
            group = handle.process_group if handle.uses_sharded_strategy else None
            infos = flat._shard_param_infos
            for p, info, shape in zip(flat._params, infos, flat._shapes):
                n = int(info.numel_in_shard) if info.in_shard else 0
                self._fsdp1[id(p)] = _Fsdp1Info(group, flat, int(info.offset_in_shard) if n else 0, n,
                                                tuple(shape))
            # Tied weights: the duplicate's data is the primary's (see FlatParamHandle._use_sharded_views).
            for p, shared in zip(flat._shared_params or (), flat._shared_param_infos or ()):
                prim = getattr(shared.prim_module, shared.prim_param_name, None)
                if id(p) not in self._fsdp1 and prim is not None and id(prim) in self._fsdp1:
                    self._fsdp1[id(p)] = self._fsdp1[id(prim)]

    def _fsdp2_unsharded_ids(self) -> set[int]:
        """ids of the plain parameters FSDP2 registers while a module is unsharded (they replace
        the DTensor parameters between the all-gather and the reshard).  Plain parameters FSDP2
        does not manage (ignored_params, modules outside any fully_shard) are not among them."""
        model = None if self._model is None else self._model()
        ids = set()
        if model is None:
            return ids
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():
            if not isinstance(m, FSDPModule):
                continue
            group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
            for fp in getattr(group, "fsdp_params", ()):
                unsharded = getattr(fp, "_unsharded_param", None)
                if unsharded is not None:
                    ids.add(id(unsharded))
        return ids

    def _fsdp1_info(self, p: Tensor) -> _Fsdp1Info | None:
        info = self._fsdp1.get(id(p))
        if info is None and getattr(p, "_fsdp_flattened", False):
            self.refresh()
            info = self._fsdp1.get(id(p))
        return info

    def localize(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], *,
                 names: Sequence[str] | None = None) -> "Localized":
        """See :func:`localize`."""
        n = len(params)
        if len(grads) != n:
            raise ValueError(f"fused_adv.localize: {n} params but {len(grads)} grads")
        DTensor = _dtensor_cls()
        if self._unsharded(params):
            # Nothing is sharded: the pieces are the parameters and nothing is reduced.  Every
            # entry with a gradient is live, empty or not (the ops take empty tensors: nothing to
            # read or write, a zero statistic); the gradients' shapes are left to the ops, which
            # check every entry against its parameter anyway (the C++/CUDA kernels in
            # csrc/common/checks.h, the Python wrappers otherwise).  No per-entry method call:
            # ~0.15 us each, 400 parameters per step.
            locals_ = self._plain_pieces(params)
            if all(map(operator.is_not, grads, itertools.repeat(None))):  # the usual case: every entry
                return Localized(locals=locals_, live=list(range(n)), params=locals_,
                                 grads=grads if isinstance(grads, list) else list(grads),
                                 plan=_NO_REDUCTION)
            live = [i for i, g in enumerate(grads) if g is not None]
            return Localized(locals=locals_, live=live, params=[locals_[i] for i in live],
                             grads=[grads[i] for i in live], plan=_NO_REDUCTION)
        locals_, local_grads, slot_groups = [], [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            if DTensor is not None and isinstance(p, DTensor):
                if not self._fsdp2 and self._model is not None and self._model() is not None:
                    self._fsdp2 = _fsdp2_present(self._model())  # wrapped after the layout was built
                lp, groups = _dtensor_local(p, self._label(names, i))
                lg = None if g is None else _dtensor_grad_local(p, g, self._label(names, i))
            else:
                lp, groups = self._plain_local(p, g, names, i)
                lg = g
            if lg is not None and lg.shape != lp.shape:
                raise ShardingError(f"fused_adv: the gradient of {self._label(names, i)} has local shape "
                                    f"{tuple(lg.shape)} but the parameter's local piece is {tuple(lp.shape)}")
            locals_.append(lp)
            local_grads.append(lg)
            slot_groups.append(groups)
        live = [i for i, (lp, lg) in enumerate(zip(locals_, local_grads)) if lg is not None and lp.numel() > 0]
        device = locals_[0].device if locals_ else torch.device("cpu")
        key = (n, tuple(live), tuple(tuple(id(g) for g in gs) for gs in slot_groups), device)
        # Plans are cached: building one copies index tensors to the device, which must not
        # happen every step.  Keys differ by live pattern (FGM vs PGD's later steps, AWP's
        # shrinking selection); the cache is bounded so a pathological caller cannot grow it.
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = _Plan.build(n, live, slot_groups, device)
        return Localized(locals=locals_, live=live, params=[locals_[i] for i in live],
                         grads=[local_grads[i] for i in live], plan=plan)

    def global_shape(self, p: Tensor) -> tuple:
        """The parameter's full (unsharded) shape: a DTensor's own shape, the original shape of an
        FSDP1 parameter (which is a 1-D view of this rank's piece outside forward), else
        ``p.shape``.  For selections by shape (e.g. the AWP paper's "dim > 1") that must not
        depend on the layout."""
        if not _is_dtensor(p) and getattr(p, "_fsdp_flattened", False):
            info = self._fsdp1_info(p)
            if info is not None:
                return info.shape
        return tuple(p.shape)

    @staticmethod
    def maybe_sharded(p: Tensor) -> bool:
        """True for a parameter that may be sharded (a DTensor, or an FSDP1 original parameter):
        one a caller must keep in its list even when its ``.grad`` is None on this rank, so that
        every rank passes the same slots (see the module docstring)."""
        return _is_dtensor(p) or bool(getattr(p, "_fsdp_flattened", False))

    def pieces(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The local piece of each parameter (what :attr:`Localized.locals` holds), without a
        reduction plan: for restore, which writes the backups back and reduces nothing."""
        if self._unsharded(params):
            return self._plain_pieces(params)
        return self.localize(params, [None] * len(params)).locals if params else []

    def _unsharded(self, params: Sequence[Tensor]) -> bool:
        """True when none of ``params`` can be sharded: no initialized process group (single
        process), or one (DDP) with no FSDP1 unit, no FSDP2 module and no DTensor / FSDP1
        parameter among them."""
        if not (dist.is_available() and dist.is_initialized()):
            return True
        if self._fsdp1 or self._fsdp2:
            return False
        DTensor = _dtensor_cls()
        return not any(isinstance(p, DTensor) or getattr(p, "_fsdp_flattened", False) for p in params)

    @staticmethod
    def _plain_pieces(params: Sequence[Tensor]) -> list[Tensor]:
        """The pieces of unsharded parameters: the parameters themselves under no_grad (where the
        methods call this: in-place ops on leaves are allowed there, and the kernels read the
        current storage; a ``detach()`` per parameter costs ~1 us, i.e. 0.8 ms per AWP step on 400
        parameters), detached views sharing storage otherwise (so that a caller with grad mode on
        can still mutate them in place).  Under no_grad a list comes back as is (not copied): the
        callers only read it, and a method's backup pool recognises the same list step after
        step (fused_adv.methods._common.BackupPool.get)."""
        if torch.is_grad_enabled():
            return [p.detach() for p in params]
        return params if isinstance(params, list) else list(params)

    @staticmethod
    def _label(names, i: int) -> str:
        return names[i] if names is not None else f"params[{i}]"

    def _plain_local(self, p: Tensor, g, names, i: int) -> tuple[Tensor, tuple]:
        """A plain tensor: an FSDP1 original parameter (its piece of the flat local shard), an
        FSDP2 parameter caught unsharded (refused), or replicated."""
        if _is_dtensor(g):
            raise ShardingError(f"fused_adv: {self._label(names, i)} is a plain tensor but its gradient is a "
                                f"DTensor with placements {tuple(g.placements)}; parameter and gradient must share "
                                "a layout")
        info = self._fsdp1_info(p)
        if info is not None:
            if info.group is None:  # NO_SHARD: the views are the whole parameters, replicated
                return p.detach(), ()
            if g is not None and (g.dim() != 1 or g.numel() != info.numel_in_shard):
                raise ShardingError(
                    f"fused_adv: the gradient of FSDP1 parameter {self._label(names, i)} has shape "
                    f"{tuple(g.shape)}, not this rank's sharded piece ({info.numel_in_shard} elements): attack "
                    "after the clean backward (FSDP reduce-scatters the gradients then), not inside "
                    "summon_full_params(with_grads=True)")
            return info.piece(), (info.group,)
        lp = p.detach()
        if getattr(p, "_fsdp_flattened", False):
            raise ShardingError(
                f"fused_adv: {self._label(names, i)} belongs to a FullyShardedDataParallel unit that the model "
                "given to the method does not contain (the FSDP wrapper is outside it), so its shard layout is "
                "unknown. Build the method with the FSDP-wrapped model.")
        if self._fsdp2 and id(p) in self._fsdp2_unsharded_ids():
            raise ShardingError(
                f"fused_adv: {self._label(names, i)} is a plain tensor in a model that FSDP2 (fully_shard) wraps: "
                "its parameters are unsharded right now (between forward and backward, or "
                "reshard_after_forward=False) and a write to them would be lost. Attack after the clean "
                "backward, or call model.reshard() first.")
        return lp, ()


def _dtensor_local(p, label: str) -> tuple[Tensor, tuple]:
    groups = []
    for dim, pl in enumerate(p.placements):
        if pl.is_partial():
            raise ShardingError(
                f"fused_adv: parameter {label} has a Partial placement ({pl}) on mesh dim {dim}: its value is "
                "a sum still to be reduced. Redistribute it to Shard/Replicate first: "
                "p = p.redistribute(p.device_mesh, [Replicate() if pl.is_partial() else pl for pl in p.placements])")
        if not pl.is_replicate():  # Shard, _StridedShard (FSDP2 + TP)
            groups.append(p.device_mesh.get_group(dim))
    with torch.no_grad():
        local = p.to_local()
    return local.detach(), tuple(groups)


def _dtensor_grad_local(p, g, label: str) -> Tensor:
    if not _is_dtensor(g):
        raise ShardingError(f"fused_adv: {label} is a DTensor ({tuple(p.placements)}) but its gradient is a plain "
                            f"tensor of shape {tuple(g.shape)}; parameter and gradient must share a layout")
    if any(pl.is_partial() for pl in g.placements):
        raise ShardingError(
            f"fused_adv: the gradient of {label} has placements {tuple(g.placements)}: a Partial gradient holds "
            "per-rank partial sums that are not reduced yet, so its norm would be wrong. Attack after the "
            "gradient reduction (FSDP2 reduces in backward; outside no_sync / set_requires_gradient_sync(True)), "
            "or reduce it first: p.grad = p.grad.redistribute(p.grad.device_mesh, p.placements)")
    if tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
        raise ShardingError(
            f"fused_adv: the gradient of {label} has placements {tuple(g.placements)} but the parameter has "
            f"{tuple(p.placements)}; the local pieces must line up elementwise. Redistribute the gradient: "
            "p.grad = p.grad.redistribute(p.device_mesh, p.placements)")
    with torch.no_grad():
        return g.to_local().detach()


@dataclass
class _Plan:
    """The collectives of one reduction call, built once per (slots, live entries, groups)."""
    n_slots: int
    live_idx: Tensor | None          # None: every slot is live, in order
    device: torch.device | None = None  # where the parameters live (the buffers' device)
    groups: list[tuple[object, Tensor | None]] = field(default_factory=list)  # (group, rows or None = all)

    @staticmethod
    def build(n_slots: int, live: list[int], slot_groups: list[tuple], device) -> "_Plan":
        order, rows = [], {}
        for i, gs in enumerate(slot_groups):
            for g in gs:
                if id(g) not in rows:
                    order.append(g)
                    rows[id(g)] = []
                rows[id(g)].append(i)
        all_live = live == list(range(n_slots))
        live_idx = None if all_live else _index(live, device)
        groups = []
        for g in order:
            r = rows[id(g)]
            groups.append((g, None if len(r) == n_slots else _index(r, device)))
        return _Plan(n_slots, live_idx, device, groups)


_MAX_PLANS = 16


def _index(values: list[int], device: torch.device) -> Tensor:
    """An int64 index tensor on ``device``.  For CUDA it is staged in pinned memory and copied
    without blocking (a pageable host-to-device copy would synchronize the stream); the pinned
    source is kept alive by the returned tensor's ``_fused_adv_src`` attribute."""
    cpu = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return cpu.to(device)
    cpu = cpu.pin_memory()
    out = cpu.to(device, non_blocking=True)
    out._fused_adv_src = cpu
    return out


_NO_REDUCTION = _Plan(0, None, None, [])

_OPS = {"sum": (dist.ReduceOp.SUM if dist.is_available() else None, 0.0),
        "max": (dist.ReduceOp.MAX if dist.is_available() else None, float("-inf"))}


@dataclass
class Localized:
    """The local view of N parameters (N = len(params) given to :func:`localize`, the same on
    every rank).

    * ``locals``: N tensors, the local piece of each parameter, sharing its storage (writes
      mutate the parameter); size 0 where this rank holds none of it.  Back up / restore these.
    * ``live``: indices (into the N) of the entries with a local gradient and a non-empty piece
      (when nothing is sharded: every entry with a gradient, empty or not).
    * ``params`` / ``grads``: the L = len(live) local pieces and their gradients' local pieces,
      contiguous-as-stored, ready for the multi-tensor ops.
    * ``sharded``: True when some parameter is sharded over a process group (then
      ``restore_mode="swap"`` must be refused).

    Read-only: when nothing is sharded, ``locals`` (and ``params`` when every entry is live) may be
    the very list given to :func:`localize`, holding the parameters themselves (under no_grad)."""
    locals: list[Tensor]
    live: list[int]
    params: list[Tensor]
    grads: list[Tensor]
    plan: _Plan

    @property
    def sharded(self) -> bool:
        return bool(self.plan.groups)

    def reduce(self, stats: Tensor, op: str = "sum", *, dim: int = 0, slots: bool = False) -> Tensor:
        """Reduces per-tensor statistics over the ranks that share each tensor.

        ``stats``: float tensor whose dimension ``dim`` has size L (one entry per live local piece,
        in ``params`` order), e.g. the float32[L] of multi_tensor_sumsq, the float32[L, 3] of
        pgd_reduce, or ``sumsq.view(2, L)`` with ``dim=1`` for AWP's grads + params.  ``op``:
        "sum" (sums of squares, dot products, L1 norms) or "max" (maxima; slots this rank does
        not hold contribute -inf).  Returns a tensor of the same shape holding the reductions.
        Issues exactly one ``torch.distributed.all_reduce`` per process group that shards one
        of the N tensors (none when nothing is sharded: ``stats`` comes back as is) and never
        reads a value to the host.  Every rank must call it (the same calls, in the same order),
        also a rank with no live piece (L = 0: pass the empty result of the op).  ``stats`` may
        be overwritten.

        ``slots=True`` returns the reduction for all N parameters instead (size N along ``dim``,
        in the order given to :func:`localize`; the fill value, 0 or -inf, where no rank has a
        live piece): what a GLOBAL statistic needs (SAM's one norm over every parameter sums
        this vector, so tensors held only by other ranks count too, replicated ones once)."""
        if op not in _OPS:
            raise ValueError(f"fused_adv: reduce op must be 'sum' or 'max', got {op!r}")
        plan = self.plan
        if not plan.groups and not (slots and len(self.live) != len(self.locals)):
            return stats
        if stats.shape[dim] != len(self.live):
            raise ValueError(f"fused_adv: stats has {stats.shape[dim]} entries along dim {dim} but there are "
                             f"{len(self.live)} live local tensors")
        reduce_op, fill = _OPS[op]
        moved = stats.movedim(dim, 0) if dim != 0 else stats
        if not plan.groups:  # unsharded, slots=True with some parameters not live: scatter only
            full = torch.full((len(self.locals), *moved.shape[1:]), fill, dtype=moved.dtype, device=moved.device)
            full.index_copy_(0, _index(self.live, moved.device), moved)
            return full.movedim(0, dim) if dim != 0 else full
        if plan.live_idx is None:
            full = moved.contiguous()
        else:
            # On the parameters' device: with no live piece here the ops return an empty CPU
            # tensor, but this rank must still take part in the collective.
            full = torch.full((plan.n_slots, *moved.shape[1:]), fill, dtype=moved.dtype, device=plan.device)
            full.index_copy_(0, plan.live_idx, moved.to(plan.device))
        for group, rows in plan.groups:
            if rows is None:
                dist.all_reduce(full, op=reduce_op, group=group)
            else:
                buf = full.index_select(0, rows)
                dist.all_reduce(buf, op=reduce_op, group=group)
                full.index_copy_(0, rows, buf)
        out = full if (slots or plan.live_idx is None) else full.index_select(0, plan.live_idx)
        return out.movedim(0, dim) if dim != 0 else out


def localize(params: Sequence[Tensor], grads: Sequence[Tensor | None], *, model: nn.Module | None = None,
             names: Sequence[str] | None = None) -> Localized:
    """Local pieces of ``params`` and ``grads`` (None where a parameter has no gradient on this
    rank) and the plan that reduces their statistics; see :class:`Localized`.

    ``model`` is needed for FSDP1 (to find the FlatParameter each original parameter lives in)
    and to detect FSDP2 parameters caught unsharded; a method should hold a
    :class:`ShardingLayout` (which caches the scan and the plan) instead of calling this per
    step.  ``names`` only improves error messages.

    Raises ShardingError for: a Partial placement on a parameter or gradient; a gradient whose
    placements differ from its parameter's; FSDP1 with ``use_orig_params=False``; FSDP1/FSDP2
    parameters caught unsharded."""
    return ShardingLayout(model).localize(params, grads, names=names)
