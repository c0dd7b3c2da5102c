"""Backend registry: which implementation serves an op call, and why the others cannot.

Backends, in auto-preference order per device:
  CUDA tensors: cuda (compiled extension) -> triton -> torch
  CPU tensors:  cpp (compiled extension)  -> torch
The ``triton`` backend also serves CPU tensors when ``TRITON_INTERPRET=1`` (tests), but auto never
picks it there.  ``backend=None`` means "auto" unless ``FUSED_ADV_BACKEND`` names a backend.
An explicit backend that cannot serve the call raises :class:`BackendUnavailableError` listing
every backend with its reason; auto falls back silently.
Which family an op belongs to, and that family's torch and Triton modules, are read from the
:class:`~fused_adv.ops._library.OpFamily` records registered by ``fused_adv.ops._library.register``;
this module keeps no table of its own.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from fused_adv.ops import _library

BACKENDS = ("cuda", "triton", "cpp", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call; the message lists every reason."""


def _family_of(op: str) -> _library.OpFamily:
    """The record of ``op``'s family (the tables are filled by _library.register from the records)."""
    try:
        return _library.FAMILY_OF[op]
    except KeyError:
        raise KeyError(f"unknown fused_adv op {op!r}") from None


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _triton_module(family: _library.OpFamily):
    # imported lazily: importing triton costs about a second and is useless on CPU-only installs
    return importlib.import_module(family.triton_module)


def why_not(backend: str, device: torch.device, op: str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    dev = device.type
    qualified = f"{_library.NAMESPACE}::{op}"
    if backend == "torch":
        return None
    if backend in ("cpp", "cuda"):
        want = "cpu" if backend == "cpp" else "cuda"
        if dev != want:
            return f"serves {want} tensors, these are on {dev}"
        if _library.EXTENSION is None:
            return f"the compiled extension fused_adv._C is not available ({_library.EXTENSION_ERROR})"
        if backend == "cuda" and not _library.extension_built_with_cuda():
            return "fused_adv._C was built without CUDA kernels (torch without CUDA, or no nvcc at build time)"
        if not _library.has_native(op, dev):
            return f"fused_adv._C has no {backend} kernel for {qualified}"
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "serves cuda tensors (cpu only under TRITON_INTERPRET=1)"
        if dev not in ("cpu", "cuda"):
            return f"does not serve {dev} tensors"
        family = _family_of(op)
        if family.triton_module is None:
            return f"has no kernels for the {family.name} op family"
        try:
            mod = _triton_module(family)
        except Exception as exc:
            return f"{family.triton_module} failed to import ({type(exc).__name__}: {exc})"
        if not hasattr(mod, op):
            return f"{family.triton_module} has no kernel for {op}"
        return None
    return f"unknown backend (choose from {', '.join(BACKENDS)} or 'auto')"


# resolve()'s answers, keyed by everything they depend on that can change in a process: the
# arguments, FUSED_ADV_BACKEND and TRITON_INTERPRET, and the registry's own state (NATIVE and
# the extension).  A training step resolves a handful of ops every step; without the cache each
# resolution re-reads the environment and re-asks why_not of every backend (host time the GPU
# waits for, docs/design.md §7 (Targets)).  Failures are not cached: they raise every time.
_RESOLVED: dict[tuple, str] = {}


def _getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read from the mapping's own dict when it has one: ``os.environ.get``
    encodes the key and decodes the value every call (~1.7 us; resolve() reads two variables per
    op call, every step).  Same answer: ``os.environ`` keeps ``_data`` in step with every
    assignment, deletion and ``monkeypatch.setenv``; a replaced ``os.environ`` (a plain dict)
    is read with ``.get``."""
    env = os.environ
    try:
        value = env._data.get(_ENCODED[name])
    except (AttributeError, KeyError):
        return env.get(name)
    return None if value is None else env.decodevalue(value)


_ENCODED = {name: os.environ.encodekey(name) for name in ("FUSED_ADV_BACKEND", "TRITON_INTERPRET")
            if hasattr(os.environ, "encodekey")}


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """The backend name that will run ``op`` on ``device`` (cached per backend, device, op and
    environment).  Raises BackendUnavailableError when an explicitly requested backend
    cannot serve the call (the message lists every backend's reason)."""
    # Keyed by the device itself, not device.type (a property that builds a new string, ~0.6 us):
    # "cuda:0" and "cuda:1" get one entry each, with the same answer.
    key = (backend, device, op, _getenv("FUSED_ADV_BACKEND"), _getenv("TRITON_INTERPRET"),
           len(_library.NATIVE), _library.EXTENSION is None)
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = _resolve(backend, device, op)
    return hit


def _resolve(backend: str | None, device: torch.device, op: str) -> str:
    requested = backend if backend not in (None, "auto") else os.environ.get("FUSED_ADV_BACKEND", "auto")
    requested = requested.strip().lower() or "auto"
    if requested == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if why_not(name, device, op) is None:
                return name
        return "torch"
    reason = why_not(requested, device, op)
    if reason is None:
        return requested
    lines = [f"backend {requested!r} cannot run fused_adv::{op} on {device.type} tensors:"]
    for name in BACKENDS:
        r = why_not(name, device, op)
        lines.append(f"  {name:7s} {'available' if r is None else r}")
    if requested not in BACKENDS:
        lines.append(f"  {requested!r} is not a backend name")
    lines.append("Pass backend='auto' (or unset FUSED_ADV_BACKEND) to let fused_adv choose.")
    raise BackendUnavailableError("\n".join(lines))


def kernel(backend: str, op: str) -> Callable:
    """The callable implementing ``op`` for a resolved backend name."""
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.fused_adv, op)
    family = _family_of(op)
    if backend == "triton":
        return getattr(_triton_module(family), op)
    return getattr(importlib.import_module(family.torch_module), op)
