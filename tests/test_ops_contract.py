"""The op layer's contract: every op family is one OpFamily record whose schemas are defined once
(from Python; csrc/ only registers kernels against them), opcheck and torch.compile on every op,
backend selection and its errors, argument validation, and the torch backend's handling of empty,
tiny, many and mixed-dtype tensor lists."""
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_adv
from fused_adv import ops
from fused_adv.ops import _library

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMAS = {name: schema for family in ops.FAMILIES for name, schema in family.schemas.items()}
WEIGHT_SCHEMAS = ops.weight.FAMILY.schemas


def test_every_family_is_registered_from_its_record():
    # family -> number of ops (a family added or changed updates this table)
    expected = {"weight": 7, "activation": 8, "weight_ext": 3, "free": 1, "sam": 2}
    assert {f.name: len(f.ops) for f in ops.FAMILIES} == expected
    assert [f.name for f in ops.FAMILIES][:2] == ["weight", "activation"]
    assert list(_library.FAMILIES.values()) == list(ops.FAMILIES)
    assert len(SCHEMAS) == sum(expected.values())     # no op in two families
    for family in ops.FAMILIES:
        assert dataclasses.is_dataclass(family) and family.ops
        with pytest.raises(dataclasses.FrozenInstanceError):
            family.name = "other"
        for op in family.ops:
            assert _library.FAMILY_OF[op.name] is family
            # the dispatcher holds exactly the record's schema (with or without the extension)
            registered = getattr(torch.ops.fused_adv, op.name).default._schema
            assert str(registered) == str(torch._C.parse_schema(f"fused_adv::{op.schema}")), op.name
            # one fake impl per op, its parameters named as in the schema
            params = [a.name for a in registered.arguments]
            assert list(op.fake.__code__.co_varnames[:op.fake.__code__.co_argcount]) == params, op.name


def test_registering_again_is_a_no_op_and_duplicates_are_refused():
    before = (dict(_library.FAMILIES), dict(_library.FAMILY_OF), set(_library.NATIVE))
    _library.register(ops.FAMILIES)
    assert (dict(_library.FAMILIES), dict(_library.FAMILY_OF), set(_library.NATIVE)) == before
    clash = dataclasses.replace(ops.weight.FAMILY, name="weight_copy")
    with pytest.raises(ValueError, match="declared twice"):
        _library.register([clash])
    with pytest.raises(ValueError, match="two op family records are named 'weight'"):
        _library.register([dataclasses.replace(ops.weight.FAMILY, ops=())])
    assert dict(_library.FAMILY_OF) == before[1]


def test_csrc_defines_no_schema_and_registers_only_declared_ops():
    """Schemas exist once, in the records: no TORCH_LIBRARY(fused_adv)/m.def in C++, and every
    kernel a TORCH_LIBRARY_IMPL block registers is an op of some record."""
    impls = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".h", ".cuh"):
            continue
        text = path.read_text()
        assert "TORCH_LIBRARY(" not in text, f"{path} defines the fused_adv library; schemas live in the records"
        # a schema string contains "(": pybind11's m.def("built_with_cuda", ...) does not
        assert not re.search(r'\bm\.def\("[^"]*\(', text), f"{path} defines a schema; write it in the family record"
        impls += re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', text)
    assert impls, "no TORCH_LIBRARY_IMPL registration found under csrc/"
    unknown = sorted(set(impls) - set(SCHEMAS))
    assert not unknown, f"csrc/ registers kernels for ops no OpFamily record declares: {unknown}"


def test_every_dispatcher_op_belongs_to_a_record():
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_adv::")}
    assert names == set(SCHEMAS)


def test_native_kernels_cover_every_op_of_the_extension():
    if _library.EXTENSION is None:
        pytest.skip(f"extension not built: {_library.EXTENSION_ERROR}")
    for name in SCHEMAS:
        assert (f"fused_adv::{name}", "CPU") in _library.NATIVE, name
        assert ops.why_not("cpp", torch.device("cpu"), name) is None


_NEW_FAMILY = textwrap.dedent("""
    import sys, types
    import torch
    from fused_adv import ops
    from fused_adv.ops import _library
    from fused_adv.ops._library import Op, OpFamily

    backend = types.ModuleType("toy_torch_backend")          # stands in for fused_adv/_torch/toy.py
    def toy_axpy_(y, x, a):
        y.add_(x, alpha=a)
    def toy_sumsq(x):
        return x.double().square().sum().float().reshape(1)
    backend.toy_axpy_, backend.toy_sumsq = toy_axpy_, toy_sumsq
    sys.modules["toy_torch_backend"] = backend

    def _fake_toy_axpy_(y, x, a):
        return None
    def _fake_toy_sumsq(x):
        return x.new_empty(1, dtype=torch.float32)
    TOY = OpFamily(name="toy",
                   ops=(Op("toy_axpy_(Tensor(a!) y, Tensor x, float a) -> ()", _fake_toy_axpy_),
                        Op("toy_sumsq(Tensor x) -> Tensor", _fake_toy_sumsq)),
                   torch_module="toy_torch_backend")
    _library.register([TOY])

    cpu = torch.device("cpu")
    y, x = torch.zeros(4), torch.arange(4.0)
    torch.library.opcheck(torch.ops.fused_adv.toy_axpy_.default, (y, x, 2.0))
    torch.library.opcheck(torch.ops.fused_adv.toy_sumsq.default, (x,))
    assert ops.resolve(None, cpu, "toy_sumsq") == "torch"
    assert ops._registry.kernel("torch", "toy_sumsq") is toy_sumsq
    why = ops.why_not("triton", torch.device("cuda"), "toy_axpy_")
    assert why == "has no kernels for the toy op family" or why.startswith("triton is not importable"), why
    why = ops.why_not("cpp", cpu, "toy_axpy_")
    assert why == "fused_adv._C has no cpp kernel for fused_adv::toy_axpy_" or _library.EXTENSION is None, why
    f = torch.compile(lambda y, x: (torch.ops.fused_adv.toy_axpy_(y, x, 3.0), torch.ops.fused_adv.toy_sumsq(y))[1],
                      backend="aot_eager", fullgraph=True)
    y = torch.ones(4)
    assert f(y, x).item() == sum((1 + 3 * v) ** 2 for v in range(4)), y
    print("ok")
""")


def test_a_new_family_is_one_record_and_one_backend_module():
    """What fused_adv/ops/__init__.py's recipe promises: a record plus a torch module give dispatcher
    ops with fakes (opcheck, torch.compile) and backend selection, with no other edit."""
    out = subprocess.run([sys.executable, "-c", _NEW_FAMILY], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


_MISMATCH = textwrap.dedent("""
    import importlib.util, sys, types
    pkg = types.ModuleType("fused_adv"); pkg.__path__ = [sys.argv[1]]
    sys.modules["fused_adv"] = pkg       # load fused_adv._C and _library.py without registering anything
    spec = importlib.util.spec_from_file_location("lib_alone", sys.argv[1] + "/ops/_library.py")
    lib = sys.modules["lib_alone"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lib)
    assert lib.EXTENSION is not None, lib.EXTENSION_ERROR
    sys.modules["fake_backend"] = types.SimpleNamespace(restore_=lambda params, backups, x: None)
    bad = lib.OpFamily("bad", (lib.Op("restore_(Tensor(a!)[] params, Tensor[] backups, float x) -> ()",
                                      lambda params, backups, x: None),), "fake_backend")
    try:
        lib.register([bad])
    except RuntimeError as exc:
        print(exc)
""")


def test_a_record_disagreeing_with_a_native_kernel_fails_loudly():
    """C++ kernels register before their schema exists; defining the schema checks them."""
    if _library.EXTENSION is None:
        pytest.skip(f"extension not built: {_library.EXTENSION_ERROR}")
    out = subprocess.run([sys.executable, "-c", _MISMATCH, str(ROOT / "fused_adv")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "defining fused_adv::restore_ from the bad family record failed" in out.stdout, out.stderr[-3000:]
    assert "doesn't match the expected function schema" in out.stdout


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
