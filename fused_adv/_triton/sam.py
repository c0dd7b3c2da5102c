"""Triton kernels of the sam ops (SAM / ASAM).

Same names, signatures and math as fused_adv._torch.sam (the statement of the op math; read its
docstring).  Per tensor i, element math in float32 (float64 tensors: float64), one rounding to
P's dtype on store:

* sam_sumsq:    sum(((|P| if adaptive else 1) * G)^2)        reads G (, P if adaptive)    (1 or 2)
* sam_perturb_: B <- P; P <- P + ((P*P)*G if adaptive else G) * scale unless the global sum is
                not finite                                   reads P, G; writes B, P      (4)

The one global norm is combined on the device by every program from the whole ``grad_sumsq``
vector (float64, a fixed order: every program gets the same bits), then
scale = (1/(n + 1e-12)) * rho in float32, as the torch backend: nothing is read back by the host
and no extra launch is needed.  Launch tables, dtype/alignment groups and the two-phase
deterministic reduction are fused_adv._triton.multi_tensor's; raw-bit loads and stores (bit-exact
backups; bf16 rounding by kernel_math.from_float).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_adv._triton import multi_tensor as mt
from fused_adv._triton.kernel_math import block_sum, device_function, from_float, to_float
from fused_adv._triton.multi_tensor import chunk_of, load_bits, role_ptr, store_bits
from fused_adv._triton.weight import _eager

# Entries of grad_sumsq summed per iteration by every program of sam_perturb_.
_TOTAL_BLOCK = 1024


# ---- sam_sumsq ----------------------------------------------------------------------------------

@device_function
def _term(pp, gp, offs, mask, ADAPTIVE: tl.constexpr, KIND: tl.constexpr, MASKED: tl.constexpr):
    g = to_float(load_bits(gp, offs, mask, MASKED), KIND)
    if ADAPTIVE:
        g = tl.abs(to_float(load_bits(pp, offs, mask, MASKED), KIND)) * g
    return g * g


@triton.jit
def _sumsq_kernel(
    chunks,                   # int64 [c_g, 2]: (tensor row, first element) of each chunk
    tens,                     # int64 [n_g, 4]: (call index, numel, address of P, G)
    part,                     # float64 [rows, 1]: row chunk_base + program id is written
    chunk_base,
    ADAPTIVE: tl.constexpr,
    KIND: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, start, count = chunk_of(chunks, tens, 4, CHUNK_SIZE)
    pp = role_ptr(row, 0, KIND, ALIGNED)
    gp = role_ptr(row, 1, KIND, ALIGNED)
    acc = tl.full([BLOCK], 0, tl.float32)
    if KIND == 3:  # float64 tensors accumulate in float64
        acc = acc.to(tl.float64)
    n_full = count // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += _term(pp, gp, offs, offs, ADAPTIVE, KIND, False)
    if n_full * BLOCK < count:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        acc += _term(pp, gp, offs, offs < start + count, ADAPTIVE, KIND, True)
    tl.store(part + chunk_base + tl.program_id(0).to(tl.int64), block_sum(acc, 0).to(tl.float64))


@_eager
def sam_sumsq(params: list[Tensor], grads: list[Tensor], adaptive: bool) -> Tensor:
    """float32[N] (see the module docstring).  One launch per dtype group plus one for phase 2."""
    if not params:
        return torch.empty(0, dtype=torch.float32)
    p = mt.plan([params, grads])
    part = mt.partials(p, 1)
    with mt.quiet():
        for g in p.groups:
            if g.n_chunks == 0:
                continue
            _sumsq_kernel[(g.n_chunks,)](g.chunks, g.tens, part, g.chunk_base, ADAPTIVE=bool(adaptive),
                                         KIND=g.kind, ALIGNED=g.aligned, CHUNK_SIZE=g.config.chunk,
                                         BLOCK=g.config.block, num_warps=g.config.num_warps)
        return mt.finish(p, part, 1).view(-1)


# ---- sam_perturb_ -------------------------------------------------------------------------------

@device_function
def _perturb_tile(pp, gp, bp, offs, mask, ok, s, ADAPTIVE: tl.constexpr, KIND: tl.constexpr,
                  MASKED: tl.constexpr):
    pbits = load_bits(pp, offs, mask, MASKED)
    store_bits(bp, offs, pbits, mask, MASKED)  # raw-bit backup of every tensor, guarded or not
    if ok:  # non-finite global norm: P is not written
        p = to_float(pbits, KIND)
        g = to_float(load_bits(gp, offs, mask, MASKED), KIND)
        if ADAPTIVE:
            g = (p * p) * g
        store_bits(pp, offs, from_float(p + g * s, KIND), mask, MASKED)


@triton.jit
def _perturb_kernel(
    chunks,                   # int64 [c_g, 2]
    tens,                     # int64 [n_g, 5]: (call index, numel, address of P, G, B)
    gsq,                      # float32 [M]: per-tensor sums of every perturbed tensor
    M,                        # its length
    RHO,                      # float32
    ADAPTIVE: tl.constexpr,
    KIND: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    TOTAL_BLOCK: tl.constexpr,
):
    row, start, count = chunk_of(chunks, tens, 5, CHUNK_SIZE)
    pp = role_ptr(row, 0, KIND, ALIGNED)
    gp = role_ptr(row, 1, KIND, ALIGNED)
    bp = role_ptr(row, 2, KIND, ALIGNED)
    # The one global norm, combined here: float64 sum of the whole vector, rounded to float32.
    acc = tl.full([TOTAL_BLOCK], 0, tl.float64)
    for k in range(0, tl.cdiv(M, TOTAL_BLOCK)):
        idx = k * TOTAL_BLOCK + tl.arange(0, TOTAL_BLOCK)
        acc += tl.load(gsq + idx, mask=idx < M, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0).to(tl.float32)
    ok = total <= 3.4028234663852886e38  # false for +inf and NaN
    one = tl.full([], 1.0, tl.float32)
    s = tl.div_rn(one, tl.sqrt_rn(total) + 1e-12) * RHO
    if KIND == 3:
        s = s.to(tl.float64)
    n_full = count // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        _perturb_tile(pp, gp, bp, offs, offs, ok, s, ADAPTIVE, KIND, False)
    if n_full * BLOCK < count:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        _perturb_tile(pp, gp, bp, offs, offs < start + count, ok, s, ADAPTIVE, KIND, True)


@_eager
def sam_perturb_(params, grads, backups, grad_sumsq: Tensor, rho: float, adaptive: bool) -> None:
    """B <- P; P <- P + (P^2 if adaptive else 1) * G * scale (see the module docstring); one launch
    per dtype group."""
    if not params:
        return
    p = mt.plan([params, grads, backups])
    m = grad_sumsq.numel()
    with mt.quiet():
        for g in p.groups:
            if g.n_chunks == 0:
                continue
            _perturb_kernel[(g.n_chunks,)](
                g.chunks, g.tens, grad_sumsq, m, float(np.float32(rho)), ADAPTIVE=bool(adaptive),
                KIND=g.kind, ALIGNED=g.aligned, CHUNK_SIZE=g.config.chunk, BLOCK=g.config.block,
                TOTAL_BLOCK=min(_TOTAL_BLOCK, triton.next_power_of_2(max(m, 16))),
                num_warps=g.config.num_warps)
