"""Triton kernel of the ``free`` op family (the original FreeAT's sign step).

Same name, signature and math as fused_adv._torch.free (the statement of the op math):
``noise <- clamp(noise + step * sign(grad), -clip, clip)``, element math in float32 (float64 for
float64 tensors), one rounding on store through fused_adv._triton.kernel_math.cast_rn (the one
bf16 rounding helper).  One launch over a 1-D grid of CHUNK_SIZE-element programs; reads noise
and grad, writes noise; nothing read back by the host.  ``step`` and ``clip`` travel as three
float32 parts each (an exact double, as fused_adv._triton.weight passes scalars) so that float64
noise gets the double values the torch backend uses.  sign is torch.sign (NaN -> 0) and the clamp
keeps NaN (``where`` on the comparisons, not tl.minimum/tl.maximum, whose NaN handling differs).
Works on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fused_adv._triton.kernel_math import cast_rn, interpreting
from fused_adv._triton.weight import _eager, _split3

# elements per program: 4096 on the GPU (16 KB of registers per stream at 4 warps); the
# interpreter prefers few, large programs.
CHUNK_SIZE = 1 << 16 if interpreting() else 4096


@triton.jit
def _freeat_update_kernel(
    NOISE,        # [N] noise, updated in place
    G,            # [N] its gradient
    N,
    s_hi, s_mid, s_lo, c_hi, c_mid, c_lo,   # step and clip, each hi + mid + lo exactly
    OPMATH: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * CHUNK_SIZE + tl.arange(0, CHUNK_SIZE)
    mask = offs < N
    # the scalars in the math dtype: float32 takes the rounding of the double (hi), float64 the
    # exact sum of the parts
    if OPMATH == tl.float64:
        step = tl.full([], 0, tl.float64) + s_hi + s_mid + s_lo
        clip = tl.full([], 0, tl.float64) + c_hi + c_mid + c_lo
    else:
        step = s_hi
        clip = c_hi
    n = tl.load(NOISE + offs, mask=mask, other=0.0).to(OPMATH)
    g = tl.load(G + offs, mask=mask, other=0.0).to(OPMATH)
    sgn = (g > 0).to(OPMATH) - (g < 0).to(OPMATH)
    v = n + step * sgn
    v = tl.where(v < -clip, -clip, tl.where(v > clip, clip, v))
    tl.store(NOISE + offs, cast_rn(v, NOISE.dtype.element_ty), mask=mask)


def _parts(x: float, dtype: torch.dtype) -> tuple[float, float, float]:
    if dtype == torch.float64:
        return _split3(x)
    return float(np.float32(x)), 0.0, 0.0


@_eager
def freeat_update_(noise, grad, step, clip):
    n = noise.numel()
    if n == 0:
        return
    s = _parts(step, noise.dtype)
    c = _parts(clip, noise.dtype) if clip != float("inf") else (float("inf"), 0.0, 0.0)
    opmath = tl.float64 if noise.dtype == torch.float64 else tl.float32
    _freeat_update_kernel[(triton.cdiv(n, CHUNK_SIZE),)](noise, grad, n, *s, *c, OPMATH=opmath,
                                                         CHUNK_SIZE=CHUNK_SIZE, num_warps=4)
