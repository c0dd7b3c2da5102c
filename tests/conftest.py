"""Test configuration shared by every test module.

Triton kernels run on CPU under the Triton interpreter; TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports fused_adv.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py, tests/tolerance.py

import pytest  # noqa: E402

from fused_adv.ops import why_not  # noqa: E402

# (device, backend) pairs every backend-parametrized test runs on; unavailable ones are skipped
# with the registry's reason, so the skip list shows what this machine could not check.  On CPU
# "triton" is the Triton interpreter (TRITON_INTERPRET=1 above).
DEVICE_BACKENDS = [("cpu", "torch"), ("cpu", "cpp"), ("cpu", "triton"),
                   ("cuda", "torch"), ("cuda", "cuda"), ("cuda", "triton")]


def skip_reason(device: str, backend: str, op: str = "restore_") -> str | None:
    """None when ``backend`` can run ``op`` on ``device`` here, else why not."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return why_not(backend, torch.device(device), op)


def backend_fixture(op: str, pairs=DEVICE_BACKENDS, scope: str = "function"):
    """The one backend-fixture factory: a fixture parametrized over the (device, backend)
    ``pairs`` (default: every pair above) that yields ``(device, backend)`` and skips, with the
    registry's reason for ``op``, the pairs this machine cannot run.  CUDA pairs carry the ``gpu``
    marker.  Use it at module level: ``backend = backend_fixture("fgm_perturb_", pairs)``, after
    ``from conftest import backend_fixture`` (benchmarks/ is a package, so this name stays
    tests/conftest.py when both folders are collected together)."""
    pairs = list(pairs)

    @pytest.fixture(scope=scope, params=[pytest.param(p, marks=[pytest.mark.gpu] if p[0] == "cuda" else [])
                                         for p in pairs], ids=[f"{d}-{b}" for d, b in pairs])
    def _fixture(request):
        device, backend = request.param
        reason = skip_reason(device, backend, op)
        if reason:
            pytest.skip(f"{backend} on {device}: {reason}")
        return device, backend

    return _fixture


# every backend, for the drop-in classes and the ops that every backend serves
device_backend = backend_fixture("restore_")


@pytest.fixture(scope="module")
def one_thread():
    """torch.set_num_threads(1) for a module of tiny-tensor tests (intra-op threads only add
    overhead there: 6x slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
