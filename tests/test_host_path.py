"""The per-step host path and the memory of the torch backend (docs/design.md §7 (Targets)).

* The selection cache of fused_adv.methods._common (select_by_name / params_with_grad): a model
  that changes between steps (new parameter, replaced or deleted parameter, requires_grad flip,
  dtype / storage change) is noticed, and the fused classes then act on the changed model.
* The backend resolution cache of fused_adv.ops._registry follows FUSED_ADV_BACKEND.
* The native fast path of the weight-op wrappers still raises the wrappers' ValueError /
  TypeError on bad arguments and still accepts non-contiguous gradients.
* The torch backend's fp16/bf16 (and AWP box) math runs in bounded pieces: transient memory of a
  call at most 0.25x the bytes of the tensors it updates, results bit for bit those of the
  whole-tensor math (NaN payloads aside: ATen picks them per loop).
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fused_adv
from fused_adv import ops
from fused_adv._torch import weight as torch_weight
from fused_adv.methods._common import params_with_grad, select_by_name
from fused_adv.ops import _library, _registry
from models import ThreeLayer, grads_on
from oracles import bits

pytestmark = pytest.mark.usefixtures("one_thread")


def names(pairs):
    return [n for n, _ in pairs]


# ---------------------------------------------------------------- selection cache
def test_selection_notices_a_new_parameter():
    m = ThreeLayer()
    assert names(select_by_name(m, "weight", what="x")) == ["word_embeddings.weight", "a.weight", "b.weight"]
    m.b.extra_weight = nn.Parameter(torch.zeros(3))           # registration hook
    assert "b.extra_weight" in names(select_by_name(m, "weight", what="x"))
    m.add_module("c", nn.Linear(2, 2))                         # a new submodule
    assert "c.weight" in names(select_by_name(m, "weight", what="x"))


def test_selection_notices_replaced_and_deleted_parameters():
    m = ThreeLayer()
    before = dict(select_by_name(m, "weight", what="x"))
    new = nn.Parameter(torch.ones(4, 4))
    m.a._parameters["weight"] = new                            # bypasses the registration hooks
    got = dict(select_by_name(m, "weight", what="x"))
    assert got["a.weight"] is new and got["b.weight"] is before["b.weight"]
    del m.a.weight
    assert "a.weight" not in names(select_by_name(m, "weight", what="x"))
    m.b.weight = None
    assert "b.weight" not in names(select_by_name(m, "weight", what="x"))


def test_selection_follows_requires_grad_and_grads():
    m = grads_on(ThreeLayer())
    assert len(select_by_name(m, "weight", what="x", require_grad=True)) == 3
    m.a.weight.requires_grad_(False)
    assert "a.weight" not in names(select_by_name(m, "weight", what="x"))
    assert all(p is not m.a.weight for p in params_with_grad(m))
    m.b.weight.grad = None
    assert names(select_by_name(m, "weight", what="x", require_grad=True)) == ["word_embeddings.weight"]
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        select_by_name(m, "weight", what="x")
    m.a.weight.requires_grad_(True)
    assert names(select_by_name(m, "weight", what="x")) == ["a.weight"]


def test_selection_keeps_tied_parameters_once():
    m = ThreeLayer()
    m.b.weight = m.word_embeddings.weight                      # tied (shapes do not matter here)
    assert names(select_by_name(m, "weight", what="x")) == ["word_embeddings.weight", "a.weight"]


@pytest.mark.parametrize("change", ["dtype", "storage"])
def test_fused_awp_after_the_model_changed(change):
    """AWP steps on a model whose dtype or storage changed since the last step give what a fresh
    AWP instance gives, and restore the new weights bit for bit."""
    torch.manual_seed(0)
    m = grads_on(ThreeLayer())
    awp = fused_adv.AWP(m, None, adv_param="weight", backend="cpp" if _library.EXTENSION else "torch")
    with awp.perturbed():
        pass
    if change == "dtype":
        m.to(torch.bfloat16)
        grads_on(m)
    else:
        for p in m.parameters():
            p.data = torch.randn_like(p)                       # new storage, same Parameter objects
    twin = ThreeLayer().to(next(m.parameters()).dtype)
    twin.load_state_dict(m.state_dict())
    for p, q in zip(m.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    fresh = fused_adv.AWP(twin, None, adv_param="weight", backend=awp.backend)
    clean = [p.detach().clone() for p in m.parameters()]
    with awp.perturbed(), fresh.perturbed():
        for p, q in zip(m.parameters(), twin.parameters()):
            assert torch.equal(bits(p.detach()), bits(q.detach()))
        assert any(not torch.equal(p.detach(), c) for p, c in zip(m.parameters(), clean))
    for p, c in zip(m.parameters(), clean):
        assert torch.equal(bits(p.detach()), bits(c))


def test_fgm_notices_a_new_embedding_parameter():
    m = grads_on(ThreeLayer())
    fgm = fused_adv.FGM(m, emb_name="word_embeddings")
    with fgm.perturbed():
        pass
    m.word_embeddings.weight = nn.Parameter(torch.zeros(10, 4))
    m.word_embeddings.weight.grad = torch.ones(10, 4)
    with fgm.perturbed():
        assert m.word_embeddings.weight.detach().abs().sum() > 0  # the new parameter moved
    assert m.word_embeddings.weight.detach().abs().sum() == 0     # and was restored


# ---------------------------------------------------------------- resolve cache
def test_resolve_follows_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FUSED_ADV_BACKEND", "torch")
    assert ops.resolve(None, cpu, "restore_") == "torch"
    monkeypatch.setenv("FUSED_ADV_BACKEND", "auto")
    want = "cpp" if _library.has_native("restore_", "cpu") else "torch"
    assert ops.resolve(None, cpu, "restore_") == want
    assert ops.resolve("torch", cpu, "restore_") == "torch"
    monkeypatch.setenv("FUSED_ADV_BACKEND", "no-such-backend")
    for _ in range(2):  # failures are not cached
        with pytest.raises(ops.BackendUnavailableError):
            ops.resolve(None, cpu, "restore_")
    monkeypatch.delenv("FUSED_ADV_BACKEND")
    assert ops.resolve("torch", torch.device("cuda"), "restore_") == "torch"
    assert ops.resolve(None, torch.device("cuda"), "restore_") != "cpp"  # keyed by device type


# ---------------------------------------------------------------- native fast path
@pytest.mark.skipif(not _library.has_native("fgm_perturb_", "cpu"), reason="no C++ kernels")
def test_native_fast_path_keeps_the_wrappers_errors():
    P = [torch.randn(5), torch.randn(3)]
    G = [torch.randn(5), torch.randn(3)]
    B = [torch.empty(5), torch.empty(3)]
    gsq = ops.multi_tensor_sumsq(G, backend="cpp")
    with pytest.raises(ValueError, match="grads\\[1\\] is"):
        ops.fgm_perturb_(P, [G[0], torch.randn(4)], B, gsq, 1.0, True, backend="cpp")
    with pytest.raises(ValueError, match="got 2 params but 1 backups"):
        ops.restore_(P, B[:1], backend="cpp")
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ops.restore_([torch.zeros(3, dtype=torch.long)], [torch.zeros(3, dtype=torch.long)], backend="cpp")
    with pytest.raises(ValueError, match="grad_sumsq must be float32"):
        ops.fgm_perturb_(P, G, B, gsq.double(), 1.0, True, backend="cpp")
    with pytest.raises(ValueError, match="must be contiguous"):
        ops.restore_([torch.randn(4, 4).t()], [torch.empty(4, 4)], backend="cpp")
    # non-contiguous grads are made contiguous (the kernel refuses them; the wrapper fixes them)
    Gt = [torch.randn(3, 5).t(), torch.randn(3)]
    P2 = [torch.randn(5, 3), torch.randn(3)]
    ref = [p.clone() for p in P2]
    gsq2 = ops.multi_tensor_sumsq(Gt, backend="cpp")
    torch.testing.assert_close(gsq2, ops.multi_tensor_sumsq([g.contiguous() for g in Gt], backend="torch"))
    ops.fgm_perturb_(P2, Gt, [torch.empty_like(p) for p in P2], gsq2, 1.0, True, backend="cpp")
    ops.fgm_perturb_(ref, [g.contiguous() for g in Gt], [torch.empty_like(p) for p in ref], gsq2, 1.0, True,
                     backend="torch")
    for a, b in zip(P2, ref):  # ATen's addcmul may fuse the multiply-add: ulps, not bits
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- torch backend memory
class PeakTemporaries(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while the mode is on (outputs not sharing an
    input's storage), alive until their tensor is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def _free(self, ptr):
        self.live.pop(ptr, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in inputs or ptr in self.live or st.nbytes() == 0:
                continue
            self.live[ptr] = st.nbytes()
            weakref.finalize(t, self._free, ptr)
            self.peak = max(self.peak, sum(self.live.values()))
        return out


def _weight_calls(P, G, B):
    gs = ops.multi_tensor_sumsq(G, backend="torch")
    ps = ops.multi_tensor_sumsq(P, backend="torch")
    st = ops.pgd_reduce(P, G, B, False, backend="torch")
    return {
        "awp_first": lambda: ops.awp_perturb_(P, G, B, gs, ps, 1.0, 0.2, True, backend="torch"),
        "awp_later": lambda: ops.awp_perturb_(P, G, B, gs, ps, 1.0, 0.2, False, backend="torch"),
        "fgm": lambda: ops.fgm_perturb_(P, G, B, gs, 1.0, True, backend="torch"),
        "fgm_no_backup": lambda: ops.fgm_perturb_(P, G, B, gs, 1.0, False, backend="torch"),
        "fgsm": lambda: ops.fgsm_perturb_(P, G, B, 0.01, True, backend="torch"),
        "pgd_first": lambda: ops.pgd_perturb_(P, G, B, st, 0.3, 0.5, True, backend="torch"),
        "pgd_later": lambda: ops.pgd_perturb_(P, G, B, st, 0.3, 0.5, False, backend="torch"),
        "pgd_reduce": lambda: ops.pgd_reduce(P, G, B, False, backend="torch"),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_torch_backend_transient_memory_is_bounded(dtype):
    torch.manual_seed(0)
    P = [torch.randn(n, dtype=dtype) for n in (200_000, 30_000, 5_000, 7)]
    G = [torch.randn_like(p) for p in P]
    B = [p + 0.01 * torch.randn_like(p) for p in P]
    weights = sum(p.numel() * p.element_size() for p in P)
    for name, call in _weight_calls(P, G, B).items():
        mode = PeakTemporaries()
        with mode:
            call()
        assert mode.peak <= 0.25 * weights, f"{name}: {mode.peak} bytes of temporaries for {weights} bytes"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_torch_backend_pieces_give_the_whole_tensor_bits(dtype, monkeypatch):
    """The same calls with one piece per tensor (the whole-tensor math) and with many pieces."""
    torch.manual_seed(1)
    P0 = [torch.randn(n, dtype=dtype) * 3 for n in (70_001, 4_097, 1)]
    P0[0][::97] = torch.tensor(float("nan"), dtype=dtype)
    G = [torch.randn_like(p) for p in P0]
    B0 = [p + 0.05 * torch.randn_like(p) for p in P0]
    results = {}
    for piece in (1 << 30, 1000):
        monkeypatch.setattr(torch_weight, "_PIECE_MIN", piece)
        monkeypatch.setattr(torch_weight, "_PIECE_MAX", piece)
        for name in _weight_calls(P0, G, B0):
            P, B = [p.clone() for p in P0], [b.clone() for b in B0]
            out = _weight_calls(P, G, B)[name]()
            results.setdefault(name, []).append((out, P, B))
    for name, ((o1, P1, B1), (o2, P2, B2)) in results.items():
        if name == "pgd_reduce":  # float64 sums of float32 piece partials: within float32 rounding
            torch.testing.assert_close(o1, o2, rtol=1e-5, atol=0, equal_nan=True)
            continue
        for a, b in zip(P1 + B1, P2 + B2):
            # NaN payloads are ATen's choice per loop (vector body vs scalar tail), which moves
            # with the piece boundaries: NaN where NaN, every other bit equal.
            nan = torch.isnan(a)
            assert torch.equal(nan, torch.isnan(b)), name
            assert torch.equal(bits(a)[~nan], bits(b)[~nan]), name
