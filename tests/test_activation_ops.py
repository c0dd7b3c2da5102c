"""Activation-space ops (SiFT / FreeLB / SMART) on every backend this machine can run, against the
reference math (fused_adv.reference.*) and a float64 oracle.

Tolerance (docs/design.md §5 (Tests)): the fused result's error against the float64 oracle must be at
most 2x the reference's own error at that dtype plus a floor of a few ulps.  Triton runs on CPU
under TRITON_INTERPRET=1 (set before fused_adv is imported).
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fused_adv.ops import activation as A  # noqa: E402
from fused_adv.ops import why_not  # noqa: E402
from fused_adv.reference.freelb import FreeLB as RefFreeLB  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import tolerance as _tolerance  # noqa: E402
from conftest import backend_fixture  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


BACKENDS = ["torch", "cpp", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


_DEV = {"device": "cpu"}  # where _x puts tensors; set by the backend fixture for its test
# every (device, backend) pair of tests/conftest.py; unavailable ones skipped with the registry's reason
_device_backend = backend_fixture("ln_delta_fwd")


@pytest.fixture
def backend(_device_backend):
    device, name = _device_backend
    _DEV["device"] = device
    yield name
    _DEV["device"] = "cpu"


def assert_close_to_oracle(fused, reference, oracle, what=""):
    """The one tolerance rule (tests/tolerance.py): fused error vs the float64 oracle <= 2x the
    reference's error at that dtype + a few ulps."""
    assert fused.dtype == reference.dtype and fused.shape == reference.shape, what
    _tolerance.assert_close_to_oracle(fused, reference, oracle, what)


def _x(shape, dtype, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(_DEV["device"])


# odd H, a single row, and a padded-batch-like shape
SHAPES = [(2, 7, 48), (1, 1, 33), (3, 5, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_ln_delta_forward(backend, dtype, shape, with_delta):
    x = _x(shape, dtype, 1, scale=3.0, shift=0.5)  # non-zero mean: the centring matters
    delta = _x(shape, torch.float32, 2, scale=1e-2) if with_delta else None
    out, mean, rstd = A.ln_delta_fwd(x, delta, 1e-7, backend=backend)
    # the reference (DeBERTa): x̂ = LayerNorm(x) in x's dtype, then (x̂.float() + delta).to(dtype)
    ref = F.layer_norm(x, shape[-1:], eps=1e-7)
    oracle = F.layer_norm(x.double(), shape[-1:], eps=1e-7)
    if with_delta:
        ref = (ref.float() + delta).to(dtype)
        oracle = oracle + delta.double()
    assert out.dtype == dtype and mean.dtype == torch.float32 and mean.shape == (x.numel() // shape[-1],)
    assert_close_to_oracle(out, ref, oracle, "ln_delta_fwd")
    xd = x.double().reshape(-1, shape[-1])
    torch.testing.assert_close(mean.double(), xd.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), 1 / (xd.var(-1, unbiased=False) + 1e-7).sqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ln_delta_backward(backend, dtype):
    shape = (2, 6, 40)
    x = _x(shape, dtype, 3, scale=2.0, shift=-1.0)
    g = _x(shape, dtype, 4)
    xf = x.clone().requires_grad_()
    A.ln_delta(xf, None, 1e-7, backend=backend).backward(g)
    xr = x.clone().requires_grad_()
    F.layer_norm(xr, shape[-1:], eps=1e-7).backward(g)
    xo = x.double().requires_grad_()
    F.layer_norm(xo, shape[-1:], eps=1e-7).backward(g.double())
    assert_close_to_oracle(xf.grad, xr.grad, xo.grad, "ln_delta backward")


def test_ln_delta_gradcheck_float64(backend):
    # both inputs differentiable: x through the normalisation, delta through the add
    # small: the Triton interpreter runs every numerical-Jacobian forward
    x = _x((2, 2, 5), torch.float64, 5, shift=0.3).requires_grad_()
    delta = _x((2, 2, 5), torch.float64, 6, scale=0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, d: A.ln_delta(a, d, 1e-7, backend=backend), (x, delta))
    assert torch.autograd.gradcheck(lambda a: A.ln_delta(a, None, 1e-5, backend=backend), (x,))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_row_absmax_sumsq(backend, dtype):
    x = _x((3, 4, 50), dtype, 7)
    x[0, 1, 3] = float("nan")
    x[1, 2, 0] = float("inf")
    stats = A.row_absmax_sumsq(x, backend=backend)
    xd = x.double().reshape(-1, 50)
    assert stats.dtype == torch.float32 and stats.shape == (12, 2)
    torch.testing.assert_close(stats[:, 0], xd.abs().amax(-1).float(), equal_nan=True)
    torch.testing.assert_close(stats[:, 1], (xd * xd).sum(-1).float(), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(stats[1, 0]) and torch.isinf(stats[6, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sift_perturb(backend, dtype):
    sigma = 1e-2
    xhat = _x((2, 5, 24), dtype, 8)
    noise = (_x((2, 5, 24), torch.float64, 9) * sigma * 3).to(dtype)  # some beyond 2 sigma
    delta, out = A.sift_perturb(xhat, noise, 2 * sigma, backend=backend)
    ref_delta = torch.clamp(noise.float(), -2 * sigma, 2 * sigma)
    assert delta.dtype == torch.float32 and torch.equal(delta, ref_delta)
    ref_out = (xhat.float() + ref_delta).to(dtype)
    assert_close_to_oracle(out, ref_out, xhat.double() + ref_delta.double(), "sift_perturb")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sift_update(backend, dtype):
    lr = 1e-2
    xhat = _x((3, 4, 40), dtype, 10)
    delta0 = _x((3, 4, 40), torch.float32, 11, scale=1e-2)
    grad = _x((3, 4, 40), torch.float32, 12, scale=1e-3)
    delta = delta0.clone()
    out = A.sift_update_(delta, grad, xhat, None, lr, backend=backend)
    # reference: PerturbationLayer.update_delta's step, in float32
    ref = delta0 + lr * grad / (1e-6 + grad.abs().max(-1, keepdim=True)[0])
    gd = grad.double()
    oracle = delta0.double() + lr * gd / (1e-6 + gd.abs().max(-1, keepdim=True)[0])
    assert_close_to_oracle(delta, ref, oracle, "sift delta")
    assert_close_to_oracle(out, (xhat.float() + ref).to(dtype), xhat.double() + oracle, "sift out")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sift_update_guard(backend, bad):
    # a single non-finite gradient entry anywhere makes ‖g‖ non-finite: delta is kept bit for bit
    xhat = _x((2, 3, 16), torch.bfloat16, 13)
    delta0 = _x((2, 3, 16), torch.float32, 14, scale=1e-2)
    grad = _x((2, 3, 16), torch.float32, 15)
    grad[1, 2, 5] = bad
    delta = delta0.clone()
    out = A.sift_update_(delta, grad, xhat, None, 1e-2, backend=backend)
    assert torch.equal(delta, delta0)
    assert torch.equal(out, (xhat.float() + delta0).to(torch.bfloat16))


def test_sift_update_guard_from_overflowing_norm(backend):
    # finite entries whose squares overflow fp32: ‖g‖ = inf in the reference too
    dev = _DEV["device"]
    delta0 = torch.zeros(2, 8, device=dev)
    grad = torch.full((2, 8), 3e19, device=dev)
    delta = delta0.clone()
    A.sift_update_(delta, grad, torch.zeros(2, 8, device=dev), None, 1.0, backend=backend)
    assert torch.isinf(grad.norm()) and torch.equal(delta, delta0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_smart_update(backend, dtype):
    step, eps = 1e-3, 1e-6
    noise0 = (_x((2, 6, 36), torch.float64, 16) * 1e-5).to(dtype)
    grad = (_x((2, 6, 36), torch.float64, 17) * 1e-2).to(dtype)
    noise = noise0.clone()
    ok = A.smart_update_(noise, grad, None, step, eps, backend=backend)
    assert ok.dtype == torch.float32 and ok.shape == () and ok.item() == 1.0

    def norm_grad(n, g):  # mt-dnn: v = noise + g * step; v / (max|v| + eps), in the input dtype
        v = n + g * step
        return v / (v.abs().max(-1, keepdim=True)[0] + eps)

    assert_close_to_oracle(noise, norm_grad(noise0, grad), norm_grad(noise0.double(), grad.double()), "smart")
    grad[0, 0, 0] = float("nan")
    noise = noise0.clone()
    ok = A.smart_update_(noise, grad, None, step, eps, backend=backend)
    assert ok.item() == 0.0 and torch.equal(noise, noise0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type,max_norm", [("l2", 0.0), ("l2", 0.05), ("linf", 0.0), ("linf", 0.004)])
def test_freelb_update(backend, dtype, norm_type, max_norm):
    b, t, e = 3, 7, 24
    mask = torch.ones(b, t, device=_DEV["device"])
    mask[1, 4:] = 0  # padded samples: delta is zero there after init
    mask[2, 2:] = 0
    embeds = _x((b, t, e), dtype, 18)
    ref = RefFreeLB(adv_lr=0.03, adv_init_mag=0.05, adv_max_norm=max_norm, adv_norm_type=norm_type)
    torch.manual_seed(0)
    delta0 = ref.init_delta(embeds, mask)
    grad = (_x((b, t, e), torch.float64, 19) * 1e-3).to(dtype) * mask[..., None].to(dtype)
    delta = delta0.clone()
    A.freelb_update_(delta, grad, None, ref.adv_lr, max_norm, norm_type == "linf", backend=backend)
    # (the original's l2 projection promotes a half-precision delta to float32: reweights is fp32;
    # the fused op updates delta in place in its own dtype, so compare at that dtype)
    want = ref.update_delta(delta0, grad).to(dtype)
    oracle = ref.update_delta(delta0.double(), grad.double())
    assert_close_to_oracle(delta, want, oracle, f"freelb {norm_type}")
    if max_norm > 0 and norm_type == "l2":  # some samples were projected, some not
        n = oracle.reshape(b, -1).norm(dim=1)
        assert (n <= max_norm * (1 + 1e-6)).all()


def test_freelb_reduce(backend):
    d = _x((2, 3, 10), torch.float32, 20)
    g = _x((2, 3, 10), torch.float32, 21)
    s = A.freelb_reduce(d, g, False, backend=backend)
    dd, gd = d.double().reshape(2, -1), g.double().reshape(2, -1)
    torch.testing.assert_close(s.double(), torch.stack([(gd * gd).sum(1), (dd * gd).sum(1), (dd * dd).sum(1)], 1),
                               rtol=1e-5, atol=1e-5)
    g[1, 0, 0] = float("nan")
    s = A.freelb_reduce(d, g, True, backend=backend)
    assert s[0, 0].item() == gd[0].abs().max().float().item() and torch.isnan(s[1, 0]) and (s[:, 1:] == 0).all()


def test_ln_delta_fp16_and_empty(backend):
    # the fused LayerNorm output dtype/shape contract for fp16 and empty inputs
    x = _x((0, 16), torch.float16, 22)
    out, mean, rstd = A.ln_delta_fwd(x, None, backend=backend)
    assert out.shape == (0, 16) and mean.shape == (0,)
    x = _x((2, 16), torch.float16, 23)
    out, _, _ = A.ln_delta_fwd(x, None, backend=backend)
    assert out.dtype == torch.float16
    assert_close_to_oracle(out, F.layer_norm(x, (16,), eps=1e-7), F.layer_norm(x.double(), (16,), eps=1e-7), "fp16")


def test_validation_errors():
    with pytest.raises(ValueError, match="delta"):
        A.ln_delta_fwd(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(TypeError, match="dtype"):
        A.row_absmax_sumsq(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="delta"):
        A.sift_update_(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16),
                       torch.zeros(2, 4))
    with pytest.raises(ValueError, match="contiguous"):
        A.freelb_update_(torch.zeros(4, 3).t(), torch.zeros(3, 4), None, 0.1, 0.0, False)
    with pytest.raises(ValueError, match="stats"):
        A.sift_update_(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 2), 0.1)


@pytest.mark.parametrize("op,args", [
    ("ln_delta_fwd", lambda: (torch.randn(3, 8), torch.randn(3, 8), 1e-7)),
    ("ln_delta_bwd", lambda: (torch.randn(3, 8), torch.randn(3, 8), torch.randn(3), torch.rand(3) + 0.5)),
    ("row_absmax_sumsq", lambda: (torch.randn(3, 8),)),
    ("sift_perturb", lambda: (torch.randn(3, 8), torch.randn(3, 8), 0.02)),
    ("sift_update_", lambda: (torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8), torch.rand(3, 2), 0.1)),
    ("smart_update_", lambda: (torch.randn(3, 8), torch.randn(3, 8), torch.rand(3, 2), 1e-3, 1e-6)),
    ("freelb_reduce", lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4), False)),
    ("freelb_update_", lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(2, 3), 0.1, 0.5, False)),
])
def test_opcheck(op, args):
    # schema, fake impl and the registered CPU kernel (torch backend or the compiled one) agree
    torch.library.opcheck(getattr(torch.ops.fused_adv, op), args(),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_ops():
    # fake impls + the in-place op's alias annotation let aot_eager trace one SiFT update
    def sift_step(x, delta, grad):
        xhat, _, _ = torch.ops.fused_adv.ln_delta_fwd(x, None, 1e-7)
        stats = torch.ops.fused_adv.row_absmax_sumsq(grad)
        return torch.ops.fused_adv.sift_update_(delta, grad, xhat, stats, 1e-2)

    x, grad = _x((2, 3, 16), torch.float32, 30), _x((2, 3, 16), torch.float32, 31)
    d1 = _x((2, 3, 16), torch.float32, 32)
    d2 = d1.clone()
    out1 = torch.compile(sift_step, backend="aot_eager", fullgraph=True)(x, d1, grad)
    out2 = sift_step(x, d2, grad)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(d1, d2)
    assert not torch.equal(d1, _x((2, 3, 16), torch.float32, 32))  # the in-place update happened


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "cuda", "triton"])
def test_no_host_sync_on_cuda(name):
    # the guards are device-side: no op may synchronise with the host
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = why_not(name, torch.device("cuda"), "sift_update_")
    if reason:
        pytest.skip(f"{name}: {reason}")
    dev = "cuda"
    x = torch.randn(4, 16, 64, device=dev)
    d = torch.randn(4, 16, 64, device=dev) * 1e-2
    g = torch.randn(4, 16, 64, device=dev)
    A.ln_delta_fwd(x, d, backend=name)  # warm-up (Triton compiles, allocator grows)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, mean, rstd = A.ln_delta_fwd(x, d, backend=name)
        A.ln_delta_bwd(g, x, mean, rstd, backend=name)
        dl, o = A.sift_perturb(x, g, 0.02, backend=name)
        A.sift_update_(dl, g, x, None, 1e-2, backend=name)
        A.smart_update_(d.clone(), g, None, 1e-3, 1e-6, backend=name)
        for linf in (False, True):
            A.freelb_update_(d.clone(), g, None, 0.1, 0.5, linf, backend=name)
    finally:
        torch.cuda.set_sync_debug_mode(0)
