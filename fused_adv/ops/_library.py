"""The op-family record and the one function that makes a family's ops exist.

An op family (``weight``, ``activation``, ...) is one :class:`OpFamily` record, written next to the
family's Python wrappers (fused_adv/ops/<family>.py).  The record holds each op's schema (the only
place the schema string is written) and its fake impl, and names the modules of the torch and
Triton backends.  :func:`register` is the only code that touches the dispatcher or the tables
below; ``fused_adv/ops/__init__.py`` calls it once with the list of records.  For each op it:

1. defines the schema from the record (the compiled extension ``fused_adv._C`` defines none: its
   ``TORCH_LIBRARY_IMPL`` blocks register kernels against names, and the dispatcher holds such a
   kernel until the schema arrives, then checks the kernel's C++ signature against it);
2. records which (op, dispatch key) pairs have a native kernel: that is what the ``cpp`` and
   ``cuda`` backends mean;
3. registers the torch backend for the keys left empty and the record's fake impl
   (``torch.library.register_fake``), so that ``torch.ops.fused_adv.*`` runs on any device and
   traces under torch.compile.

The extension is imported before anything is defined.  A missing or broken extension never breaks
``import fused_adv``: its error is kept in ``EXTENSION_ERROR`` and reported by
``python -m fused_adv.info``.  See docs/design.md §3 (Op contract).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Iterable

import torch

NAMESPACE = "fused_adv"


@dataclasses.dataclass(frozen=True)
class Op:
    """One custom op: ``schema`` without the namespace (``"name(Tensor x, ...) -> Tensor"``) and
    ``fake``, a function with the op's signature that returns empty tensors of the result's shape,
    dtype and device (None for ops returning nothing): what torch.compile and opcheck trace."""

    schema: str
    fake: Callable

    @property
    def name(self) -> str:
        return self.schema.split("(", 1)[0].strip()


@dataclasses.dataclass(frozen=True)
class OpFamily:
    """Everything the op layer needs to know about one op family.

    * ``name``: the family's name (``"weight"``), used in messages;
    * ``ops``: its :class:`Op` records (schema + fake impl), one per op;
    * ``torch_module``: import path of the pure-PyTorch backend, one function per op, same name and
      signature as the schema (always importable: it is also the fallback of every device);
    * ``triton_module``: import path of the Triton launchers (same names and signatures), imported
      only when the triton backend is asked for an op; None if the family has no Triton kernels.

    Native (C++ CPU / CUDA) kernels are not named here: csrc/cpu/<family>.cpp and
    csrc/cuda/<family>.cu register them by op name with ``TORCH_LIBRARY_IMPL``, and :func:`register`
    finds them in the dispatcher.
    """

    name: str
    ops: tuple[Op, ...]
    torch_module: str
    triton_module: str | None = None

    @property
    def schemas(self) -> dict[str, str]:
        """op name -> schema, in record order."""
        return {op.name: op.schema for op in self.ops}


EXTENSION = None
EXTENSION_ERROR: str | None = None
if os.environ.get("FUSED_ADV_DISABLE_EXTENSION", "0") == "1":
    EXTENSION_ERROR = "disabled by FUSED_ADV_DISABLE_EXTENSION=1"
else:
    try:
        EXTENSION = importlib.import_module("fused_adv._C")
    except Exception as exc:  # ImportError, undefined symbols, ABI mismatch: all mean "not built"
        EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

# Filled by register() only, from the records it is given.
FAMILIES: dict[str, OpFamily] = {}          # family name -> record, in registration order
FAMILY_OF: dict[str, OpFamily] = {}         # op name -> its family's record
NATIVE: set[tuple[str, str]] = set()        # (qualified op name, dispatch key) served by fused_adv._C
_FRAGMENT = torch.library.Library(NAMESPACE, "FRAGMENT")
_IMPL = torch.library.Library(NAMESPACE, "IMPL")


def _defined_schema(qualified: str) -> str | None:
    """The schema the dispatcher holds for ``qualified``, or None (a kernel registered by
    TORCH_LIBRARY_IMPL before its schema does not count as a definition)."""
    schemas = torch._C._jit_get_schemas_for_operator(qualified)
    return str(schemas[0]) if schemas else None


def _define(op: Op, family: OpFamily) -> None:
    qualified = f"{NAMESPACE}::{op.name}"
    wanted = str(torch._C.parse_schema(f"{NAMESPACE}::{op.schema}"))
    existing = _defined_schema(qualified)
    if existing is not None:
        if existing != wanted:
            raise RuntimeError(
                f"{qualified} is already defined as {existing!r}, but the {family.name} family record "
                f"says {wanted!r}; a stale build of fused_adv._C? Rebuild it (pip install -e .)")
        return
    try:
        _FRAGMENT.define(op.schema)
    except RuntimeError as exc:
        # the dispatcher checks kernels registered earlier by fused_adv._C against the new schema
        raise RuntimeError(
            f"defining {qualified} from the {family.name} family record failed; a native kernel "
            f"registered by fused_adv._C disagrees with the schema (rebuild the extension, or fix "
            f"the kernel's C++ signature): {exc}") from exc


def register(families: Iterable[OpFamily]) -> None:
    """Defines and registers every op of every family (steps 1-3 of the module docstring) and
    adds the records to ``FAMILIES`` / ``FAMILY_OF``.  Idempotent for a record already registered;
    raises ValueError when two records use the same family or op name, and AttributeError when a
    torch backend module lacks one of its family's ops."""
    for family in families:
        if FAMILIES.get(family.name) is family:
            continue
        if family.name in FAMILIES:
            raise ValueError(f"two op family records are named {family.name!r}")
        names = [op.name for op in family.ops]
        for name in names:
            if names.count(name) > 1 or name in FAMILY_OF:
                owner = FAMILY_OF[name].name if name in FAMILY_OF else family.name
                raise ValueError(f"fused_adv::{name} is declared twice (families {owner!r} and {family.name!r})")
        impls = importlib.import_module(family.torch_module)
        missing = [name for name in names if not hasattr(impls, name)]
        if missing:
            raise AttributeError(f"{family.torch_module} (torch backend of the {family.name} family) "
                                 f"has no function for {', '.join(missing)}")
        for op in family.ops:
            qualified = f"{NAMESPACE}::{op.name}"
            _define(op, family)
            for key in ("CPU", "CUDA"):
                if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
                    NATIVE.add((qualified, key))
                else:
                    _IMPL.impl(op.name, getattr(impls, op.name), key)
            torch.library.register_fake(qualified, op.fake, lib=_FRAGMENT)
            FAMILY_OF[op.name] = family
        FAMILIES[family.name] = family


def has_native(name: str, device_type: str) -> bool:
    """Whether fused_adv._C registered a kernel for op ``name`` on ``device_type`` ("cpu"/"cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (f"{NAMESPACE}::{name}", key) in NATIVE


def extension_built_with_cuda() -> bool:
    """Whether fused_adv._C is loaded and was compiled with its CUDA kernels."""
    return EXTENSION is not None and bool(getattr(EXTENSION, "built_with_cuda", lambda: False)())
