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

FGM/FGSM/PGD use ``select_by_name(model, emb_name, what="emb_name")``; AWP uses
``select_by_name(model, adv_param, what="adv_param", require_grad=True)``.
"""
from __future__ import annotations

import contextlib
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
    that notices a changed model (see _named_matches).

    Raises ValueError naming the embedding-like parameters when no trainable parameter name
    contains ``pattern`` (the community classes silently do nothing then).  With
    ``require_grad``, parameters whose ``.grad`` is None are left out (not an error)."""
    chosen, any_name = [], False
    for name, p in _named_matches(model, pattern):
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


def params_with_grad(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` with ``requires_grad`` and a ``.grad`` that is not None, in
    ``model.parameters()`` order (each once, tied or not).  May be empty; raises nothing."""
    return [p for _, p in _named_matches(model, "") if p.requires_grad and p.grad is not None]


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


def _named_matches(model: nn.Module, pattern: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter of ``model`` whose qualified name contains
    ``pattern``, in named_parameters() order, each once (tied ones under their first name),
    trainable or not: cached (see above), verified on every call."""
    try:
        per_model = _SELECTIONS.get(model)
    except TypeError:  # not weak-referenceable: no cache
        per_model = None
    entry = per_model.get(pattern) if per_model is not None else None
    if entry is not None and entry[0] == _GENERATION[0]:
        _, pairs, slots = entry
        if all(d.get(attr) is p for d, attr, p in slots):
            return pairs
    pairs, slots, cacheable = [], [], True
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
            slots.append((held, attr, p))
    if cacheable:
        try:
            _SELECTIONS.setdefault(model, {})[pattern] = (_GENERATION[0], pairs, slots)
        except TypeError:
            pass
    return pairs


class BackupPool:
    """Backups allocated once per parameter and reused every step (steady state allocates nothing).

    Keyed by parameter identity; a buffer is reallocated only if the parameter's shape, dtype or
    device changed (e.g. model.half() between steps)."""

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}

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
        return out

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


class Perturbation:
    """What the drop-in classes share: the attacked state, restore, ``perturbed()`` and memory.

    Subclasses set ``self._pool`` (a BackupPool), ``self.backend``, ``self.restore_mode`` and
    ``self._attacked`` (list of (param, backup) while attacked, else None), and define
    ``attack(**kwargs)``; ``_attack_defaults`` lets them fill in keyword defaults for
    ``perturbed()``."""

    _attacked: list | None = None

    @torch.no_grad()
    def restore(self, *_args, **_kwargs) -> None:
        """Puts the backed-up weights back bit for bit: every attacked parameter gets its backup
        (arguments are accepted for drop-in compatibility with ``restore(emb_name=...)`` and
        ignored: what was attacked is restored).

        ``restore_mode='copy'``: one multi-tensor copy into the parameters' own storage;
        ``'swap'``: ``param.data`` is re-pointed at the backup (no copy; the old storage becomes
        the next backup).  ``.grad`` is not touched.  Raises AttackStateError when nothing is
        attacked (restore without attack, or twice)."""
        if self._attacked is None:
            raise AttackStateError(f"{type(self).__name__}.restore() called without a prior attack")
        pieces = None
        if self.restore_mode == "copy":
            pieces = self._sharding().pieces([p for p, _ in self._attacked])
        self._pool.restore(self._attacked, self.backend, self.restore_mode, pieces)
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
        if self._deepspeed() is not None and self.restore_mode == "swap":
            raise ShardingError(
                f"{type(self).__name__}(restore_mode='swap') re-points param.data, which would cut the weights off "
                f"the DeepSpeed ZeRO-{self._deepspeed().stage} engine's flat buffers / partitions; use "
                "restore_mode='copy' (the default) under DeepSpeed")
        if loc.sharded and self.restore_mode == "swap":
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
