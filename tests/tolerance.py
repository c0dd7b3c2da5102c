"""The one tolerance rule for every numerical test (DESIGN.md §5, flash-attention style).

A fused result is compared with a float64 computation of the same thing (the oracle); its error
may be at most TWICE the error that the reference implementation makes at the same dtype, plus a
small floor of a few units in the last place of that dtype (relative to the oracle's magnitude).
NaN positions must agree exactly.
"""
from __future__ import annotations

import torch

# floor, as a multiple of the dtype's machine epsilon times max(1, max|oracle|)
FLOOR_ULPS = 4
EPS = {torch.float64: torch.finfo(torch.float64).eps, torch.float32: torch.finfo(torch.float32).eps,
       torch.float16: torch.finfo(torch.float16).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}
# fp32 training runs must also agree with the reference within this relative error (issue 2)
FP32_TRAINING_RTOL = 2e-5


def floor(dtype: torch.dtype, oracle: torch.Tensor) -> float:
    finite = oracle[torch.isfinite(oracle)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return FLOOR_ULPS * EPS[dtype] * scale


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
                           what: str = "") -> None:
    """fused and reference: results at the tested dtype; oracle: float64 result."""
    dtype = fused.dtype
    err_fused, err_ref = max_error(fused, oracle), max_error(reference, oracle)
    bound = 2 * err_ref + floor(dtype, oracle.double())
    assert err_fused <= bound, (f"{what}: fused error {err_fused:.3e} > bound {bound:.3e} "
                                f"(reference error {err_ref:.3e}, dtype {dtype})")
