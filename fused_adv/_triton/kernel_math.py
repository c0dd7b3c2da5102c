"""Device math shared by every Triton kernel of fused_adv (weight and activation families).

The Triton side of csrc/common/kernel_math.h, under the same names (see the naming scheme at the
top of that header): the math dtype is called ``opmath`` (float32, float64 for float64 tensors;
kernel constexpr ``OPMATH``), elements per chunk ``CHUNK_SIZE``, the zero/NaN guard ``norm_ok``.

Rounding to bfloat16 is done in one place, :func:`bf16_rne_bits`: every kernel that stores or
rounds to bfloat16 goes through it (via :func:`from_float`, :func:`round_to` or :func:`cast_rn`),
because triton's interpreter truncates fp32 -> bf16 (and ignores fp_downcast_rounding), which
would make the CPU-checked results differ from the GPU's.  float16 rounding is ``.to(float16)``
(round to nearest even in the interpreter and on the GPU).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when triton runs kernels in its Python interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_function(fn):
    """``@triton.jit`` for a device (helper) function.  Under the interpreter the plain Python
    function is used instead: the interpreter re-patches triton.language on every call of a
    jitted helper (~7 ms each; it made every program instance ~50 ms), and the kernel's own patch,
    active while the helper runs, already covers it.  Same source, same semantics."""
    return fn if interpreting() else triton.jit(fn)


# tl.sum / tl.max are jitted wrappers around tl.reduce: under the interpreter every call of a
# jitted function re-patches triton.language (~8 ms; tl.sum costs two), while tl.reduce with the
# standard combine functions runs as one numpy call.  Same reduction on the GPU.  The combine
# functions are private names of triton.language.standard, so fall back to the wrappers if a
# triton version lacks them.
if hasattr(tl.standard, "_sum_combine") and hasattr(tl.standard, "_elementwise_max"):
    @device_function
    def block_sum(x, AXIS: tl.constexpr):
        """tl.sum(x, AXIS)"""
        return tl.reduce(x, AXIS, tl.standard._sum_combine)

    @device_function
    def block_max(x, AXIS: tl.constexpr):
        """tl.max(x, AXIS)"""
        return tl.reduce(x, AXIS, tl.standard._elementwise_max)
else:  # pragma: no cover - older/newer triton without the private combine functions
    @device_function
    def block_sum(x, AXIS: tl.constexpr):
        """tl.sum(x, AXIS)"""
        return tl.sum(x, AXIS)

    @device_function
    def block_max(x, AXIS: tl.constexpr):
        """tl.max(x, AXIS)"""
        return tl.max(x, AXIS)


@device_function
def to_float(bits, KIND: tl.constexpr):
    """Raw bits -> the math dtype: float32, or float64 for float64 tensors (exact)."""
    if KIND == 2:    # bf16: the top half of a float32
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:
        x = bits.to(tl.float16, bitcast=True).to(tl.float32)
    elif KIND == 0:
        x = bits.to(tl.float32, bitcast=True)
    else:
        x = bits.to(tl.float64, bitcast=True)
    return x


@device_function
def bf16_rne_bits(x):
    """float32 -> the uint16 bits of bfloat16, rounded to nearest even with integer ops (as
    c10::BFloat16 does); NaN becomes the quiet NaN of the same sign (torch CPU gives 0x7FC0), so a
    NaN never rounds into an infinity or a zero.  The GPU cost is a few integer ops in
    memory-bound kernels."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = tl.where(x != x, (u >> 16) | 0x40, r)
    return r.to(tl.uint16)


@device_function
def from_float(x, KIND: tl.constexpr):
    """Math dtype -> raw bits of KIND (multi_tensor element kinds), rounded to nearest even."""
    if KIND == 2:
        bits = bf16_rne_bits(x)
    elif KIND == 1:
        bits = x.to(tl.float16).to(tl.uint16, bitcast=True)
    elif KIND == 0:
        bits = x.to(tl.uint32, bitcast=True)
    else:
        bits = x.to(tl.uint64, bitcast=True)
    return bits


@device_function
def round_to(x, KIND: tl.constexpr):
    """x rounded to KIND's precision, kept in the math dtype (identity for fp32/fp64)."""
    if KIND == 2:
        y = to_float(bf16_rne_bits(x), KIND)
    elif KIND == 1:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


@device_function
def cast_rn(x, DTYPE: tl.constexpr):
    """x (math dtype) rounded to the tensor dtype DTYPE, nearest even: the value to store."""
    if DTYPE == tl.bfloat16:
        y = (bf16_rne_bits(x.to(tl.float32)).to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(DTYPE)
    else:
        y = x.to(DTYPE)
    return y


@device_function
def norm_ok(n):
    """The zero/NaN guard of every norm-scaled step: n != 0 and n is not NaN (+inf passes)."""
    return (n != 0) & (n == n)


@device_function
def nan_absmax(x, AXIS: tl.constexpr):
    """max |x| along AXIS, NaN if any entry is NaN (torch.amax; tl.max may drop NaNs)."""
    amax = tl.max(tl.abs(x), axis=AXIS)
    has_nan = tl.sum((x != x).to(tl.int32), axis=AXIS) > 0
    return tl.where(has_nan, float("nan"), amax)
