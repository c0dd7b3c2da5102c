"""The op layer's contract: schemas defined once and identical in C++ and Python, opcheck and
torch.compile on every op, backend selection and its errors, argument validation, and the
torch backend's handling of empty, tiny, many and mixed-dtype tensor lists."""
import re
import subprocess
import sys

import pytest
import torch

import fused_adv
from fused_adv import ops
from fused_adv.ops import _library
from fused_adv.ops._schemas import SCHEMAS as WEIGHT_SCHEMAS
from fused_adv.ops._schemas_activation import SCHEMAS as ACTIVATION_SCHEMAS

SCHEMAS = {**WEIGHT_SCHEMAS, **ACTIVATION_SCHEMAS}     # every op family's Python copy of csrc/ops.cpp


def test_schemas_match_the_compiled_extension():
    if _library.EXTENSION is None:
        pytest.skip(f"extension not built: {_library.EXTENSION_ERROR}")
    for name, schema in SCHEMAS.items():
        registered = getattr(torch.ops.fused_adv, name).default._schema
        assert str(registered) == str(torch._C.parse_schema(f"fused_adv::{schema}")), name


def test_csrc_ops_cpp_defines_each_schema_once():
    """TORCH_LIBRARY(fused_adv) must appear in exactly one translation unit (two abort)."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    hits = [p for p in root.rglob("*.c*") if "TORCH_LIBRARY(fused_adv" in p.read_text()]
    assert [p.name for p in hits] == ["ops.cpp"]
    text = (root / "ops.cpp").read_text()
    joined = re.sub(r'"\s*"', "", text)         # C++ adjacent string literals -> one literal
    for name, schema in SCHEMAS.items():
        assert text.count(f'm.def("{name}(') == 1, name
        assert f'm.def("{schema}");' in joined, f"{name}: csrc/ops.cpp and the Python schema copy differ"


def _args(name, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    shapes = [(3, 5), (7,), (1,)]
    P = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    G = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    B = [p + 0.1 * torch.randn_like(p) for p in P]
    n = len(P)
    s = torch.rand(n, device=device) + 0.5
    return {
        "multi_tensor_sumsq": (G,),
        "pgd_reduce": (P, G, B, False),
        "fgm_perturb_": (P, G, B, s, 0.5, True),
        "fgsm_perturb_": (P, G, B, 0.5, True),
        "pgd_perturb_": (P, G, B, torch.rand(n, 3, device=device), 0.3, 1.0, False),
        "awp_perturb_": (P, G, B, s, s + 1, 0.5, 0.2, True),
        "restore_": (P, B),
    }[name]


@pytest.mark.parametrize("name", list(WEIGHT_SCHEMAS))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.fused_adv, name).default, _args(name))


def test_torch_compile_traces_the_ops():
    def fgm_step(P, G, B):
        s = torch.ops.fused_adv.multi_tensor_sumsq(G)
        torch.ops.fused_adv.fgm_perturb_(P, G, B, s, 1.0, True)
        return s

    P, G, B = _args("pgd_reduce")[:3]
    P2 = [p.clone() for p in P]
    B2 = [b.clone() for b in B]
    compiled = torch.compile(fgm_step, backend="aot_eager", fullgraph=True)
    s1 = compiled(P, G, B)
    s2 = fgm_step(P2, G, B2)
    torch.testing.assert_close(s1, s2)
    for a, b in zip(P + B, P2 + B2):
        torch.testing.assert_close(a, b)


def test_explicit_unavailable_backend_lists_every_reason():
    P, G, B = _args("pgd_reduce")[:3]
    with pytest.raises(ops.BackendUnavailableError) as err:
        ops.restore_(P, B, backend="cuda")
    msg = str(err.value)
    for name in ops.BACKENDS:
        assert f"  {name} " in msg
    assert "serves cuda tensors" in msg
    with pytest.raises(ops.BackendUnavailableError, match="not a backend name"):
        ops.restore_(P, B, backend="tpu")


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("FUSED_ADV_BACKEND", "torch")
    assert ops.resolve(None, torch.device("cpu"), "restore_") == "torch"
    monkeypatch.setenv("FUSED_ADV_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError):
        ops.resolve("auto", torch.device("cpu"), "restore_")
    assert ops.resolve("torch", torch.device("cpu"), "restore_") == "torch"  # argument wins


def test_auto_never_picks_the_interpreter_on_cpu():
    assert ops.resolve("auto", torch.device("cpu"), "restore_") in ("cpp", "torch")


def test_validation_errors_say_what_to_do():
    P, G, B = _args("pgd_reduce")[:3]
    with pytest.raises(ValueError, match="got 3 params but 2 grads"):
        ops.fgsm_perturb_(P, G[:2], B, 0.1, True)
    with pytest.raises(ValueError, match=r"grads\[1\] is \(8,\)"):
        ops.fgsm_perturb_(P, [G[0], torch.zeros(8), G[2]], B, 0.1, True)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ops.multi_tensor_sumsq([torch.ones(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="must be contiguous"):
        t = torch.randn(4, 4).t()
        ops.restore_([t], [t.contiguous()])
    with pytest.raises(ValueError, match=r"grad_sumsq must be float32 \(3,\)"):
        ops.fgm_perturb_(P, G, B, torch.ones(2), 1.0, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_many_tiny_empty_and_mixed_tensors(dtype, device_backend):
    """>110 tensors in one call, including 0- and 1-element ones and mixed dtypes, against float64."""
    device, backend = device_backend
    g = torch.Generator().manual_seed(0)
    shapes = [(0,), (1,), (3, 0), (5,), (17, 3)] + [(int(k),) for k in torch.randint(1, 40, (110,), generator=g)]
    dtypes = [dtype if i % 3 else torch.float32 for i in range(len(shapes))]
    P = [torch.randn(s, generator=g).to(device, d) for s, d in zip(shapes, dtypes)]
    G = [torch.randn(s, generator=g).to(device, d) for s, d in zip(shapes, dtypes)]
    s = ops.multi_tensor_sumsq(G, backend=backend)
    expect = torch.stack([x.double().square().sum() for x in G]).float()
    torch.testing.assert_close(s.cpu(), expect, rtol=1e-5, atol=1e-6)
    B = [torch.empty_like(p) for p in P]
    P0 = [p.clone() for p in P]
    ops.fgm_perturb_(P, G, B, s, 0.5, True, backend=backend)
    for p0, b in zip(P0, B):
        assert torch.equal(p0, b)
    for p0, p, x, n in zip(P0, P, G, s.double().sqrt().cpu()):
        if p.numel():
            want = p0.double() + (0.5 * x.double() / n if n != 0 else 0)
            # norms are float32 by contract, so float64 params get float32-accurate steps
            eps = max(torch.finfo(p.dtype).eps, torch.finfo(torch.float32).eps)
            tol = 4 * eps * max(1.0, want.abs().max().item())
            assert (p.double() - want).abs().max().item() <= tol
    ops.restore_(P, B, backend=backend)
    for p0, p in zip(P0, P):
        assert torch.equal(p0, p)


def test_empty_lists_are_no_ops():
    assert ops.multi_tensor_sumsq([]).shape == (0,)
    assert ops.pgd_reduce([], [], [], True).shape == (0, 3)
    ops.fgm_perturb_([], [], [], torch.empty(0), 1.0, True)
    ops.restore_([], [])


def test_info_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "fused_adv.info"], capture_output=True, text=True, check=True).stdout
    for name in ops.BACKENDS:
        assert f"  {name} " in out
    assert f"fused_adv {fused_adv.__version__}" in out
