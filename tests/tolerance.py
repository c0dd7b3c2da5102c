"""The one tolerance rule for every numerical test (docs/design.md §5 (Tests), flash-attention style).

A fused result is compared with a float64 computation of the same thing (the oracle); its error
may be at most TWICE the error that the reference implementation makes at the same dtype, plus a
small floor of a few units in the last place of that dtype (relative to the oracle's magnitude).
NaN positions must agree exactly.

One documented widening: ops whose per-tensor factors (norms, step sizes) are float32 by contract
for every dtype pass ``floor_dtype=torch.float32`` for float64 tensors, because two correctly
rounded fp32 factor computations may differ by an fp32 ulp, which then dominates a float64
result's error.
"""
from __future__ import annotations

import torch

# floor, as a multiple of the dtype's machine epsilon times max(1, max|oracle|)
FLOOR_ULPS = 4
EPS = {torch.float64: torch.finfo(torch.float64).eps, torch.float32: torch.finfo(torch.float32).eps,
       torch.float16: torch.finfo(torch.float16).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}
# fp32 training runs must also agree with the reference within this relative error (issue 2)
FP32_TRAINING_RTOL = 2e-5


def floor(dtype: torch.dtype, oracle: torch.Tensor, floor_dtype: torch.dtype | None = None) -> float:
    """FLOOR_ULPS ulps of ``dtype`` (or of ``floor_dtype`` when that is coarser) at the oracle's scale."""
    finite = oracle[torch.isfinite(oracle)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    eps = EPS[dtype] if floor_dtype is None else max(EPS[dtype], EPS[floor_dtype])
    return FLOOR_ULPS * eps * scale


def max_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    x, oracle = x.double(), oracle.double()
    nan_x, nan_o = torch.isnan(x), torch.isnan(oracle)
    assert torch.equal(nan_x, nan_o), f"NaN positions differ: {nan_x.sum()} vs {nan_o.sum()} NaNs"
    keep = ~nan_o
    if not keep.any():
        return 0.0
    a, b = x[keep], oracle[keep]
    inf = torch.isinf(b)
    assert torch.equal(a[inf], b[inf]), "infinite entries differ"
    return (a[~inf] - b[~inf]).abs().max().item() if (~inf).any() else 0.0


def assert_close_to_oracle(fused: torch.Tensor, reference: torch.Tensor, oracle: torch.Tensor,
                           what: str = "", floor_dtype: torch.dtype | None = None) -> None:
    """fused and reference: results at the tested dtype (any device); oracle: float64 result."""
    dtype = fused.dtype
    fused, reference, oracle = fused.cpu(), reference.cpu(), oracle.cpu()
    err_fused, err_ref = max_error(fused, oracle), max_error(reference, oracle)
    bound = 2 * err_ref + floor(dtype, oracle.double(), floor_dtype)
    assert err_fused <= bound, (f"{what}: fused error {err_fused:.3e} > bound {bound:.3e} "
                                f"(reference error {err_ref:.3e}, dtype {dtype})")


def assert_all_close_to_oracle(fused, reference, oracle, what: str = "",
                               floor_dtype: torch.dtype | None = None) -> None:
    """The rule above, tensor by tensor over three equally long lists (empty tensors skipped)."""
    assert len(fused) == len(reference) == len(oracle), what
    for i, (f, r, o) in enumerate(zip(fused, reference, oracle)):
        if f.numel():
            assert f.dtype == r.dtype and f.shape == r.shape, f"{what}[{i}]"
            assert_close_to_oracle(f, r, o, f"{what}[{i}] {tuple(f.shape)} {f.dtype}", floor_dtype)
