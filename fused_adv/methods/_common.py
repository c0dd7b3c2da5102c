"""What the fused drop-in classes share: choosing parameters, owning their backups, restoring them.

Parameter collection lives HERE and only here (new methods and sharded backends extend these
functions instead of walking ``model.named_parameters()`` themselves).  The contract:

* :func:`select_by_name` ``(model, pattern, what=..., require_grad=False)``: the parameters an
  attack perturbs.  Chosen: ``requires_grad`` is True and ``pattern`` is a substring of the
  qualified name (the community rule), each parameter once even when tied, in
  ``named_parameters()`` order.  With ``require_grad=True`` those whose ``.grad`` is None are
  left out.  Raises ValueError (listing embedding-like names) when NO trainable parameter's name
  contains ``pattern``.  When names match but none has a ``.grad`` (``require_grad=True``) the
  result is an empty list; the attack then raises :class:`NoGradientError`
  (:func:`no_gradient_error`) instead of moving nothing (the Kaggle class silently does nothing).
* :func:`params_with_grad` ``(model)``: every trainable parameter whose ``.grad`` is not None
  (PGD's clean-gradient set-aside).  May be empty; never raises.
* :func:`embedding_like_parameters` ``(model)``: names for error messages only.

* :func:`select_params` ``(model, pattern, what=...)``: the parameters of ``select_by_name``
  without the names, as a list that is the same object step after step while the selection does
  not change (what the backup pools key on; callers must not mutate it).

FGM/FGSM/PGD use ``select_by_name(model, emb_name, what="emb_name")``; AWP uses
``select_params(model, adv_param, what="adv_param")`` and keeps the entries with a ``.grad``.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from typing import Iterable

import torch
from torch import nn

from fused_adv import ops
from fused_adv.sharding import Localized, ShardingError, ShardingLayout
from fused_adv.sharding_deepspeed import DeepSpeedLayout, deepspeed_layout

RESTORE_MODES = ("copy", "swap")


def check_restore_mode(mode: str) -> str:
    """Returns ``mode`` if it is one of RESTORE_MODES ('copy', 'swap'); raises ValueError otherwise."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {mode!r}")
    return mode


class AttackStateError(RuntimeError):
    """A method was called out of order (restore without attack, attack twice, ...)."""


class NoGradientError(ValueError):
    """An attack found no gradient for any parameter it chose: it would move nothing."""


def no_gradient_error(cls_name: str, what: str, pattern: str) -> NoGradientError:
    """The error an attack raises when none of its chosen parameters has a gradient, naming the
    causes (every method, with or without a sharded or DeepSpeed layout)."""
    return NoGradientError(
        f"{cls_name}: none of the parameters chosen by {what}={pattern!r} has a gradient, so the attack would "
        "move nothing. Causes: the attack came before loss.backward() / engine.backward(loss), or after "
        "optimizer.zero_grad() / engine.step(); the chosen weights are frozen or unused by the forward (a "
        "frozen PEFT/LoRA embedding: use FreeLB / SMART / SiFT, which perturb the embedding output); or a "
        "wrapper keeps the gradients elsewhere (DeepSpeed ZeRO: build the method with the engine or "
        "engine.module so they are read from ZeRO's partitions).")


def embedding_like_parameters(model: nn.Module) -> list[str]:
    """Names of parameters that look like embeddings: weights of nn.Embedding modules, or
    parameters whose name contains 'emb'.  Used to make 'matched nothing' errors actionable."""
    names = []
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if id(p) in embedding_weights or "emb" in name.lower():
            names.append(f"{name} {tuple(p.shape)}")
    return names


def select_by_name(model: nn.Module, pattern: str, *, what: str, require_grad: bool = False
                   ) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose name contains ``pattern`` (substring, as the community classes),
    each reached once even when tied (model.named_parameters() dedupes), from a per-model cache
    that notices a changed model (see _selection).

    Raises ValueError naming the embedding-like parameters when no trainable parameter name
    contains ``pattern`` (the community classes silently do nothing then).  With
    ``require_grad``, parameters whose ``.grad`` is None are left out (not an error)."""
    chosen, any_name = [], False
    for name, p in _selection(model, pattern).pairs:
        if not p.requires_grad:
            continue
        any_name = True
        if require_grad and p.grad is None:
            continue
        chosen.append((name, p))
    if not any_name:
        candidates = embedding_like_parameters(model) or ["(none found)"]
        raise ValueError(
            f"{what}={pattern!r} matches no trainable parameter of {type(model).__name__}, so the attack "
            f"would silently do nothing. Embedding-like parameters: {', '.join(candidates[:12])}. "
            f"Pass {what}= a substring of one of these names.")
    return chosen


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def select_params(model: nn.Module, pattern: str, *, what: str) -> list[nn.Parameter]:
    """The parameters of ``select_by_name(model, pattern, what=what)`` (trainable, name containing
    ``pattern``, each once, in named_parameters() order), without building (name, parameter) pairs:
    when every name-matched parameter is trainable, the cached list itself, the same object on
    every call until the selection changes (read-only: do not mutate it).  Raises what
    :func:`select_by_name` raises."""
    params = _selection(model, pattern).params
    if params and all(map(_REQUIRES_GRAD, params)):
        return params
    return [p for _, p in select_by_name(model, pattern, what=what)]


def params_with_grad(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` with ``requires_grad`` and a ``.grad`` that is not None, in
    ``model.parameters()`` order (each once, tied or not).  May be empty; raises nothing."""
    return [p for p in _selection(model, "").params if p.requires_grad and p.grad is not None]


# ---- the selection cache ---------------------------------------------------------------------
# Walking model.named_parameters() costs ~1 ms per step on a 400-parameter model (most of a fused
# step's host time, docs/design.md §7 (Targets)), and its answer almost never changes.  So the
# (name, parameter) pairs whose name contains a pattern are kept per (model, pattern), and each
# call re-reads only what can change cheaply per parameter (requires_grad, .grad: filtered above).
# A cached list is rebuilt when
# * any module anywhere registers a parameter or a submodule (torch's global registration hooks
#   bump _GENERATION: a new or replaced parameter, an added layer), or
# * one of its parameters is no longer what its module holds under that name (checked on every
#   call: ``del m.weight``, ``m.weight = None``, writes into ``m._parameters`` that bypass the
#   hooks, as FSDP's views do).
# dtype, device and storage changes (model.half(), .to(), ``p.data = ...``) keep the Parameter
# objects, so the selection stays right; the backups follow them (BackupPool.get) and the kernels
# read the current storage.
_GENERATION = [0]
_SELECTIONS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _bump_generation(*_args) -> None:
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_module_registration_hook(_bump_generation)


class _Selection:
    """The name-matched parameters of one (model, pattern): ``pairs`` (name, parameter), ``params``
    (the parameters alone) and, for the per-call check, where each one is held (``dicts[i]``, a
    module's ``_parameters``, under ``attrs[i]``)."""
    __slots__ = ("generation", "pairs", "params", "dicts", "attrs")

    def __init__(self, generation, pairs, params, dicts, attrs):
        self.generation, self.pairs, self.params, self.dicts, self.attrs = generation, pairs, params, dicts, attrs

    def holds(self) -> bool:
        """Every parameter is still what its module holds under its name (a C-level loop:
        ~0.1 us per parameter)."""
        return all(map(operator.is_, map(dict.get, self.dicts, self.attrs), self.params))


def _selection(model: nn.Module, pattern: str) -> _Selection:
    """(name, parameter) for every parameter of ``model`` whose qualified name contains
    ``pattern``, in named_parameters() order, each once (tied ones under their first name),
    trainable or not: cached (see above), verified on every call."""
    try:
        per_model = _SELECTIONS.get(model)
    except TypeError:  # not weak-referenceable: no cache
        per_model = None
    entry = per_model.get(pattern) if per_model is not None else None
    if entry is not None and entry.generation == _GENERATION[0] and entry.holds():
        return entry
    pairs, dicts, attrs, cacheable = [], [], [], True
    for name, p in model.named_parameters():
        if pattern in name:
            prefix, _, attr = name.rpartition(".")
            pairs.append((name, p))
            try:
                held = model.get_submodule(prefix)._parameters
            except AttributeError:
                held = {}
            # A model whose named_parameters() does not name where the parameter is held (an
            # override, a wrapper) cannot be verified: it is walked every call, as before.
            cacheable = cacheable and held.get(attr) is p
            dicts.append(held)
            attrs.append(attr)
    entry = _Selection(_GENERATION[0], pairs, [p for _, p in pairs], dicts, attrs)
    if cacheable:
        try:
            _SELECTIONS.setdefault(model, {})[pattern] = entry
        except TypeError:
            pass
    return entry


def no_grad(fn):
    """``torch.no_grad()`` as a decorator for the per-step methods, at a tenth of its cost (the
    context-manager decorator clones a no_grad object and enters it: ~4 us per call, several
    calls per step; docs/design.md §7 (Targets)).  Same effect: grad mode off inside, the
    previous mode back afterwards, also when ``fn`` raises.  Plain functions only (not
    generators or context managers)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(prev)
    return wrapper


class BackupPool:
    """Backups allocated once per parameter and reused every step (steady state allocates nothing).

    Keyed by parameter identity; a buffer is reallocated only if the parameter's shape, dtype or
    device changed (e.g. model.half() between steps)."""

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}
        self._last: tuple[list, list] | None = None  # (params list, its backups): see reuse()

    def get(self, params: Iterable[torch.Tensor], like: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """One contiguous backup buffer per parameter (same shape, dtype, device; contents
        undefined until written), allocated on first use and reused afterwards.  ``like``: the
        parameters' local pieces (fused_adv.sharding), when the buffers are shard-sized."""
        out = []
        for i, p in enumerate(params):
            t = p if like is None else like[i]
            b = self._buffers.get(id(p))
            if b is None or b.shape != t.shape or b.dtype != t.dtype or b.device != t.device:
                b = torch.empty_like(t, memory_format=torch.contiguous_format).detach()
                self._buffers[id(p)] = b
            out.append(b)
        self._last = (params, out) if isinstance(params, list) and (like is None or like is params) else None
        return out

    def reuse(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The list the last :meth:`get` returned when it was given this very list object (the
        cached selection of :func:`select_params`) as the parameters and as their pieces, else
        None.  NOT re-checked against the parameters (that check is ~1 us per parameter, most
        of a 400-parameter step): a caller must hand the result to an op that checks every
        backup against its parameter before writing anything (every weight op does: the
        kernels in csrc/common/checks.h, the Python wrappers for the other backends), and call
        :meth:`get` and retry when that op refuses (a parameter changed dtype, device or shape)."""
        last = self._last
        return last[1] if last is not None and last[0] is params else None

    def restore(self, pairs: list[tuple[nn.Parameter, torch.Tensor]], backend: str, mode: str,
                pieces: list[torch.Tensor] | None = None) -> None:
        """P <- B for every (param, backup) pair, bit-exact.

        mode "copy": one multi-tensor copy; the parameter keeps its storage.
        mode "swap": no pass at all: ``param.data`` is re-pointed at its backup (what the community
        classes do) and the perturbed storage becomes the next step's backup buffer.  Opt-in,
        because anything holding the parameter's old storage breaks: flattened-parameter
        optimizers and FSDP/DeepSpeed views, CUDA graphs, compiled code guarding on addresses.
        """
        if mode == "swap":
            self._last = None  # the buffers change hands: a reused list would name the parameters' storage
            for p, b in pairs:
                perturbed = p.data
                p.data = b
                self._buffers[id(p)] = perturbed
        else:
            dst = data_of(p for p, _ in pairs) if pieces is None else pieces
            keep = [i for i, d in enumerate(dst) if d.numel()]
            ops.restore_([dst[i] for i in keep], [pairs[i][1] for i in keep], backend=backend)

    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drops every buffer (the next ``get`` allocates again)."""
        self._buffers.clear()
        self._last = None


class Attacked:
    """What an attack backed up: ``backups[i]`` holds the weights of ``params[i]`` (two lists, so
    that restore() hands them to the op as they are instead of rebuilding them from pairs: ~50 us
    per step on 400 parameters).  Iterates, indexes and measures as the list of (param, backup)
    pairs the methods kept before."""
    __slots__ = ("params", "backups")

    def __init__(self, params: list, backups: list):
        self.params, self.backups = params, backups

    def __iter__(self):
        return zip(self.params, self.backups)

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, i: int) -> tuple:
        return self.params[i], self.backups[i]


class Perturbation:
    """What the drop-in classes share: the attacked state, restore, ``perturbed()`` and memory.

    Subclasses set ``self._pool`` (a BackupPool), ``self.backend``, ``self.restore_mode`` and
    ``self._attacked`` (an :class:`Attacked`, or a list of (param, backup), while attacked, else
    None; set it only once the backups hold the weights), and define
    ``attack(**kwargs)``; ``_attack_defaults`` lets them fill in keyword defaults for
    ``perturbed()``."""

    _attacked: "Attacked | list | None" = None

    @no_grad
    def restore(self, *_args, **_kwargs) -> None:
        """Puts the backed-up weights back bit for bit: every attacked parameter gets its backup
        (arguments are accepted for drop-in compatibility with ``restore(emb_name=...)`` and
        ignored: what was attacked is restored).

        ``restore_mode='copy'``: one multi-tensor copy into the parameters' own storage;
        ``'swap'``: ``param.data`` is re-pointed at the backup (no copy; the old storage becomes
        the next backup).  ``.grad`` is not touched.  Raises AttackStateError when nothing is
        attacked (restore without attack, or twice)."""
        attacked = self._attacked
        if attacked is None:
            raise AttackStateError(f"{type(self).__name__}.restore() called without a prior attack")
        if self.restore_mode == "copy":
            params = attacked.params if isinstance(attacked, Attacked) else [p for p, _ in attacked]
            pieces = self._sharding().pieces(params)
            if pieces is params:  # unsharded: the parameters themselves, the lists as the attack made them
                ops.restore_(params, attacked.backups if isinstance(attacked, Attacked) else [b for _, b in attacked],
                             backend=self.backend)
            else:
                self._pool.restore(attacked, self.backend, "copy", pieces)
        else:
            self._pool.restore(attacked, self.backend, self.restore_mode)
        self._attacked = None

    _layout: ShardingLayout | None = None

    def _sharding(self) -> ShardingLayout | DeepSpeedLayout:
        """The model's layout, built at the first attack (a DeepSpeed engine may be built after the
        method): a :class:`fused_adv.sharding_deepspeed.DeepSpeedLayout` when the model is a
        DeepSpeed engine at ZeRO-1/2/3 or a module inside one (the gradients live in ZeRO's
        partitions), else a :class:`fused_adv.sharding.ShardingLayout` (plain, DDP, ZeRO-0,
        DTensor, FSDP1).  Both give ``localize(params, grads, names=)`` and ``pieces(params)``.
        Raises ShardingError for FSDP1 use_orig_params=False and ZeRO-Offload."""
        if self._layout is None:
            model = getattr(self, "model", None)
            ds = None if model is None else deepspeed_layout(model)
            self._layout = ds if ds is not None and ds.stage > 0 else ShardingLayout(model)
        return self._layout

    def _deepspeed(self) -> DeepSpeedLayout | None:
        """The DeepSpeed ZeRO-1/2/3 layout, or None (see :meth:`_sharding`)."""
        layout = self._sharding()
        return layout if isinstance(layout, DeepSpeedLayout) else None

    def _localize(self, params, grads, names=None) -> Localized:
        """Local pieces + reduction plan (docs/methods.md §12 (Sharded training))."""
        loc = self._sharding().localize(params, grads, names=names)
        if self.restore_mode != "swap":
            return loc
        if self._deepspeed() is not None:
            raise ShardingError(
                f"{type(self).__name__}(restore_mode='swap') re-points param.data, which would cut the weights off "
                f"the DeepSpeed ZeRO-{self._deepspeed().stage} engine's flat buffers / partitions; use "
                "restore_mode='copy' (the default) under DeepSpeed")
        if loc.sharded:
            raise ShardingError(
                f"{type(self).__name__}(restore_mode='swap') re-points param.data, which would cut a sharded "
                "parameter off its shard storage (FSDP flat shard / DTensor local tensor); use "
                "restore_mode='copy' (the default) with sharded models")
        return loc

    def _attack_defaults(self, kwargs: dict) -> dict:
        return kwargs

    @contextlib.contextmanager
    def perturbed(self, **attack_kwargs):
        """Context manager: ``attack(**attack_kwargs)`` on entry, :meth:`restore` on exit (also
        when the block raises).  Yields self.  Raises what ``attack`` raises (then nothing is
        restored, because nothing was attacked)."""
        self.attack(**self._attack_defaults(attack_kwargs))
        try:
            yield self
        finally:
            self.restore()

    @property
    def is_attacked(self) -> bool:
        """True between an attack and the restore."""
        return self._attacked is not None

    def extra_memory_bytes(self) -> int:
        """Bytes held by the backups: one copy of the perturbed weights."""
        return self._pool.nbytes()


def data_of(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """Detached views sharing storage: the ops mutate them in place outside autograd."""
    return [p.detach() for p in params]
