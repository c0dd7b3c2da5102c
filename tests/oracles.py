"""Float64 oracles of the weight-space ops, shared by every backend's tests.

Written from docs/methods.md §1 (FGM), §2 (FGSM), §3 (PGD) and §4 (AWP (Kaggle)), independently of
the backends: each takes the op's inputs (at any dtype, on any device) and returns float64 CPU
tensors of what the op must produce.  The torch backend is the at-dtype reference the fused
backends are measured against (tests/tolerance.py: at most 2x its error against these oracles).

Guard rule (docs/methods.md §10 (Cross-cutting rules)): a tensor whose gradient norm is 0 or NaN is
left untouched; a +inf norm is NOT skipped.
"""
from __future__ import annotations

import math

import torch

# raw-bit views: backups and restores are compared bit for bit (NaN payloads, -0.0, subnormals)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype]) if t.dtype in BITS else t


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def guard(n: float) -> bool:
    """True when a tensor with gradient norm ``n`` is perturbed (n != 0 and not NaN)."""
    return n != 0 and not math.isnan(n)


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().cpu()


def _norms(ts, sumsq=None) -> list[float]:
    """Per-tensor L2 norms: sqrt of the given (float32) sums of squares when the op receives them
    as an input, else computed in float64 from the tensors."""
    if sumsq is None:
        return [float(_d(t).norm()) for t in ts]
    return [math.sqrt(float(v)) if not math.isnan(float(v)) else float("nan") for v in sumsq.cpu()]


def sumsq(ts) -> torch.Tensor:
    """multi_tensor_sumsq: sum of squares of every tensor, shape [N]."""
    return torch.tensor([float(_d(t).square().sum()) for t in ts], dtype=torch.float64)


def pgd_stats(P, G, B, first: bool) -> torch.Tensor:
    """pgd_reduce: [N, 3] = (||G||^2, <P-B, G>, ||P-B||^2); the last two are 0 on the first step
    (the backup is not read then)."""
    rows = []
    for p, g, b in zip(P, G, B):
        g64 = _d(g).reshape(-1)
        if first:
            rows.append([float(g64 @ g64), 0.0, 0.0])
        else:
            d = (_d(p) - _d(b)).reshape(-1)
            rows.append([float(g64 @ g64), float(d @ g64), float(d @ d)])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)


def fgm(P, G, eps: float, grad_sumsq=None) -> list[torch.Tensor]:
    """fgm_perturb_: P + eps * G / ||G|| per tensor (guarded)."""
    return [_d(p) + eps * _d(g) / n if guard(n) else _d(p) for p, g, n in zip(P, G, _norms(G, grad_sumsq))]


def fgsm(P, G, eps: float) -> list[torch.Tensor]:
    """fgsm_perturb_: P + eps * sign(G) (no guard; sign(0) = sign(NaN) = 0)."""
    return [_d(p) + eps * torch.sign(_d(g)) for p, g in zip(P, G)]


def pgd(P, G, B, alpha: float, eps: float, first: bool = False) -> list[torch.Tensor]:
    """pgd_perturb_: step P' = P + alpha * G / ||G||, then project r = P' - B onto the eps-ball
    around the backup B (B = P on the first step)."""
    out = []
    for p, g, b in zip(P, G, B):
        p64, g64 = _d(p), _d(g)
        b64 = p64 if first else _d(b)
        n = float(g64.norm())
        if not guard(n):
            out.append(p64)
            continue
        r = p64 + alpha * g64 / n - b64
        rn = float(r.norm())
        if rn > eps:
            r = eps * r / rn
        out.append(b64 + r)
    return out


def awp(P, G, B, adv_lr: float, adv_eps: float, first: bool = False, grad_sumsq=None,
        param_sumsq=None) -> list[torch.Tensor]:
    """awp_perturb_: P + adv_lr * G / (||G|| + 1e-6) * (||P|| + 1e-6), clamped to the box
    B -/+ adv_eps * |B| (B = P on the first step).  The box is computed in P's dtype, as the
    reference computes it, then widened to float64."""
    out = []
    for p, g, b, n1, n2 in zip(P, G, B, _norms(G, grad_sumsq), _norms(P, param_sumsq)):
        if not guard(n1):
            out.append(_d(p))
            continue
        bb = p if first else b
        e = adv_eps * bb.abs()
        lo, hi = _d(bb - e), _d(bb + e)
        v = _d(p) + adv_lr * _d(g) / (n1 + 1e-6) * (n2 + 1e-6)
        out.append(torch.minimum(torch.maximum(v, lo), hi))
    return out
