"""Loads the compiled extension and makes every fused_adv op exist, whatever was built.

Order matters and runs once, at import of ``fused_adv.ops``:
1. import ``fused_adv._C`` (defines the schemas with TORCH_LIBRARY and registers the C++ CPU and,
   when built with CUDA, CUDA kernels);
2. define from Python whatever schema the extension did not (extension absent or older);
3. record which (op, dispatch key) pairs have a native kernel: that is what the ``cpp`` and
   ``cuda`` backends mean;
4. register the torch backend for the keys left empty and a fake impl for every op, so that
   ``torch.ops.fused_adv.*`` runs on any device and traces under torch.compile.

A missing or broken extension never breaks ``import fused_adv``: its error is kept in
``EXTENSION_ERROR`` and reported by ``python -m fused_adv.info``.
"""
from __future__ import annotations

import importlib
import os

import torch

from fused_adv.ops._schemas import SCHEMAS as _WEIGHT_SCHEMAS

NAMESPACE = "fused_adv"

# op family name -> (schemas, module of the torch backend implementing them)
FAMILIES: dict[str, tuple[dict[str, str], str]] = {
    "weight": (_WEIGHT_SCHEMAS, "fused_adv._torch.weight"),
}

EXTENSION = None
EXTENSION_ERROR: str | None = None
if os.environ.get("FUSED_ADV_DISABLE_EXTENSION", "0") == "1":
    EXTENSION_ERROR = "disabled by FUSED_ADV_DISABLE_EXTENSION=1"
else:
    try:
        EXTENSION = importlib.import_module("fused_adv._C")
    except Exception as exc:  # ImportError, undefined symbols, ABI mismatch: all mean "not built"
        EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

# (qualified op name, dispatch key) pairs served by compiled kernels, filled by register_family.
NATIVE: set[tuple[str, str]] = set()
_FRAGMENT = torch.library.Library(NAMESPACE, "FRAGMENT")
_IMPL = torch.library.Library(NAMESPACE, "IMPL")
_REGISTERED: set[str] = set()


def op_exists(name: str) -> bool:
    return torch._C._dispatch_has_kernel(f"{NAMESPACE}::{name}") or bool(
        torch._C._jit_get_schemas_for_operator(f"{NAMESPACE}::{name}"))


def _fake_impl(name: str):
    """Shapes of each op's result: reductions give float32 [N] or [N, 3]; in-place ops nothing."""
    def fake(*args):
        tensors = args[0]
        device = tensors[0].device if len(tensors) else torch.device("cpu")
        if name == "multi_tensor_sumsq":
            return torch.empty(len(tensors), dtype=torch.float32, device=device)
        if name == "pgd_reduce":
            return torch.empty(len(tensors), 3, dtype=torch.float32, device=device)
        return None
    return fake


def register_family(family: str, fake_impls: dict | None = None) -> None:
    """Defines (if needed) and registers every op of ``family``; idempotent."""
    schemas, torch_module = FAMILIES[family]
    impls = importlib.import_module(torch_module)
    for name, schema in schemas.items():
        if name in _REGISTERED:
            continue
        qualified = f"{NAMESPACE}::{name}"
        if not op_exists(name):
            _FRAGMENT.define(schema)
        for key in ("CPU", "CUDA"):
            if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
                NATIVE.add((qualified, key))
            else:
                _IMPL.impl(name, getattr(impls, name), key)
        fake = (fake_impls or {}).get(name) or _fake_impl(name)
        torch.library.register_fake(qualified, fake, lib=_FRAGMENT)
        _REGISTERED.add(name)


def has_native(name: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (f"{NAMESPACE}::{name}", key) in NATIVE


def extension_built_with_cuda() -> bool:
    return EXTENSION is not None and bool(getattr(EXTENSION, "built_with_cuda", lambda: False)())


register_family("weight")
