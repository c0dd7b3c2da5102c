"""Multi-tensor launch bookkeeping for the Triton kernels (apex ``multi_tensor_apply`` style).

One launch serves any number of tensors: the host writes, once per distinct call signature, an
int64 table in device memory and every program reads from it which tensor and which elements it
owns.  Table layout (one int64 buffer per signature, cached; views of it are the kernel args):

* ``ranges``  [N, 2]      per tensor (in call order): first and one-past-last row of its chunks
                          in the partials buffer (phase 2 of the reductions sums that range);
* per dtype group (tensors of one dtype and one alignment class, in call order):
  ``tens``    [n_g, TS]   per tensor: (index in the call, numel, address of role 0, role 1, ...),
                          TS = 2 + number of roles (e.g. P, G, B);
  ``chunks``  [c_g, 2]    per chunk: (row in ``tens``, first element); chunks of one tensor are
                          consecutive, each covers CHUNK_SIZE elements (the last one fewer).

Addresses are raw ``data_ptr()`` integers: a kernel turns them into typed pointers with
``int.to(tl.pointer_type(...))``.  Under ``TRITON_INTERPRET=1`` CPU tensors' addresses are real
host addresses, so the very same kernels run in CI.  Element offsets are int64 everywhere
(a chunk start is an int64 loaded from the table), so tensors over 2**31 elements are fine.

Dtype groups exist because a pointer's element type is a compile-time property: one launch per
phase per group.  Alignment groups exist so that the common case (every address 16-byte aligned,
as the caching allocator gives) can promise it to the compiler (``tl.multiple_of``) and get
16-byte vector loads; a misaligned view still works, in its own launch, with scalar accesses.

Reductions are two-phase and deterministic: phase 1 writes one float64 partial per chunk (and per
column), phase 2 (:func:`finish`) sums each tensor's partials in a fixed order.  No atomics.

No function here reads a device value back to the host.  The table upload is a non-blocking copy
from pinned memory and is cached by (device, stream, dtypes, numels, addresses): in a training
loop whose tensors keep their storage (the usual case: parameters, backups, and gradients that
the caching allocator hands back at the same addresses) the steady state uploads and allocates
nothing but the small partials buffer.
"""
from __future__ import annotations

import collections
import contextlib
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# device_function / block_* / interpreting are shared with the activation kernels: kernel_math.py
from fused_adv._triton.kernel_math import block_max, block_sum, device_function, interpreting  # noqa: F401

# Element kinds (constexpr codes: a kernel is specialised per kind).
F32, F16, BF16, F64 = 0, 1, 2, 3
KIND_OF = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.float64: F64}
_ELEM_BYTES = {F32: 4, F16: 2, BF16: 2, F64: 8}

# GPU launch config: 16 bytes per vector access, two vectors per thread per tile, 8 warps:
# BLOCK = 2 * 16 B * 256 threads / element size; a program walks CHUNK_SIZE = 8 tiles (64 KiB of each
# tensor), so a 335M-parameter set is ~20k programs and the per-program prologue (table loads,
# per-tensor factors) is amortised over 16k+ elements.  Fixed per dtype (no autotune: the update
# kernels are in place and must not be re-run on live data).
_GPU_NUM_WARPS = 8
_GPU_TILE_BYTES = 2 * 16 * 32 * _GPU_NUM_WARPS
_GPU_TILES_PER_CHUNK = 8
# Under the interpreter every program instance costs ~1.4 ms of Python, and each tl op costs
# numpy time proportional to BLOCK: one tile per program, BLOCK sized to the largest tensor of the
# group (at least 16, at most 2**18 so that a 2**31-element tensor is 8192 programs).
_INTERP_MIN_BLOCK = 16
_INTERP_MAX_BLOCK = 1 << 18
# Phase 2: tensors per program and partial rows per tensor per iteration (GPU; interpreter).
FINISH_TENSORS, FINISH_ROWS = 16, 32
FINISH_TENSORS_INTERP, FINISH_ROWS_INTERP = 256, 4


class LaunchConfig(NamedTuple):
    chunk: int       # elements per program (a multiple of block)
    block: int       # elements per tile (power of two)
    num_warps: int


def launch_config(kind: int, max_numel: int) -> LaunchConfig:
    """The fixed config for a dtype group (GPU) or one sized to its tensors (interpreter)."""
    if interpreting():
        block = min(max(triton.next_power_of_2(max(max_numel, 1)), _INTERP_MIN_BLOCK), _INTERP_MAX_BLOCK)
        return LaunchConfig(block, block, 1)
    block = _GPU_TILE_BYTES // _ELEM_BYTES[kind]
    return LaunchConfig(block * _GPU_TILES_PER_CHUNK, block, _GPU_NUM_WARPS)


class Group(NamedTuple):
    """The tensors of one launch: one dtype, one alignment class."""
    kind: int
    aligned: bool        # every address of every role is 16-byte aligned
    config: LaunchConfig
    tens: Tensor         # int64 [n_g, TS] view of the table
    chunks: Tensor       # int64 [c_g, 2] view of the table
    n_chunks: int
    chunk_base: int      # row of this group's first chunk in the partials buffer


class Plan(NamedTuple):
    n: int               # tensors in the call
    groups: tuple        # of Group, in order of first appearance
    ranges: Tensor       # int64 [N, 2]
    n_chunks: int        # over all groups
    table: Tensor        # the buffer the views above live in
    device: torch.device


_CACHE: "collections.OrderedDict[tuple, Plan]" = collections.OrderedDict()
_CACHE_SIZE = 64


def _stream_key(device: torch.device) -> int:
    # A table copied on one stream is only guaranteed visible to work queued after it on that
    # stream: key the cache by stream so a new stream gets its own upload.
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def plan(roles: Sequence[Sequence[Tensor]]) -> Plan:
    """The (cached) launch plan for ``roles``: R lists of N tensors; entry i of every role has the
    numel and dtype of ``roles[0][i]``; all on one device, contiguous (validated by fused_adv.ops).
    """
    first = roles[0]
    n = len(first)
    device = first[0].device
    if interpreting() and device.type != "cpu":
        raise RuntimeError(
            "fused_adv triton backend: TRITON_INTERPRET=1 runs kernels on the host, so it serves "
            f"CPU tensors only (got {device.type} tensors); unset TRITON_INTERPRET to run on the GPU")
    dtypes = tuple(t.dtype for t in first)
    numels = tuple(t.numel() for t in first)
    addrs = tuple(tuple(t.data_ptr() for t in role) for role in roles)
    key = (device, _stream_key(device), interpreting(), dtypes, numels, addrs)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit

    ts = 2 + len(roles)
    # group key -> list of tensor indices, in call order
    members: dict[tuple[int, bool], list[int]] = {}
    for i in range(n):
        aligned = all(a[i] % 16 == 0 for a in addrs)
        members.setdefault((KIND_OF[dtypes[i]], aligned), []).append(i)

    ranges = [0] * (2 * n)
    body: list[int] = []
    layout = []  # (kind, aligned, config, tens offset, n tensors, chunks offset, n chunks, chunk base)
    offset = 2 * n
    chunk_base = 0
    for (kind, aligned), idx in members.items():
        cfg = launch_config(kind, max(numels[i] for i in idx))
        tens_off = offset
        for i in idx:
            body.append(i)
            body.append(numels[i])
            body.extend(a[i] for a in addrs)
        offset += ts * len(idx)
        chunks_off = offset
        c = 0
        for row, i in enumerate(idx):
            ranges[2 * i] = chunk_base + c
            for start in range(0, numels[i], cfg.chunk):
                body.append(row)
                body.append(start)
                c += 1
            ranges[2 * i + 1] = chunk_base + c
        offset += 2 * c
        layout.append((kind, aligned, cfg, tens_off, len(idx), chunks_off, c, chunk_base))
        chunk_base += c

    host = torch.tensor(ranges + body, dtype=torch.int64)
    if device.type == "cuda":
        # pinned + non_blocking: no host sync (the caching host allocator keeps the pinned block
        # alive until the copy has run)
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host
    groups = tuple(
        Group(kind, aligned, cfg,
              table[t_off:t_off + ts * nt].view(nt, ts),
              table[c_off:c_off + 2 * nc].view(nc, 2), nc, base)
        for kind, aligned, cfg, t_off, nt, c_off, nc, base in layout)
    result = Plan(n, groups, table[:2 * n].view(n, 2), chunk_base, table, device)
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def quiet():
    """Silences numpy's divide-by-zero warnings in the interpreter (1/0 = inf is then selected
    away by the guards, exactly as on the GPU); a no-op context on the GPU."""
    if interpreting():
        import numpy as np
        return np.errstate(divide="ignore", invalid="ignore", over="ignore")
    return contextlib.nullcontext()


def partials(p: Plan, ncol: int) -> Tensor:
    """float64 [max(chunks, 1), ncol] scratch for phase 1 (never read before it is written)."""
    return torch.empty(max(p.n_chunks, 1), ncol, dtype=torch.float64, device=p.device)


def finish(p: Plan, part: Tensor, ncol: int) -> Tensor:
    """Phase 2: float32 [N, ncol], row i = sum of tensor i's partial rows, in a fixed order."""
    out = torch.empty(p.n, ncol, dtype=torch.float32, device=p.device)
    tpb, rows = (FINISH_TENSORS_INTERP, FINISH_ROWS_INTERP) if interpreting() else (FINISH_TENSORS, FINISH_ROWS)
    _finish_kernel[(triton.cdiv(p.n, tpb),)](
        p.ranges, part, out, p.n, NCOL=ncol, NCOL_P2=triton.next_power_of_2(ncol), TPB=tpb, ROWS=rows,
        num_warps=4)
    return out


@triton.jit
def _finish_kernel(
    ranges,                   # int64 [N, 2]: partial rows [begin, end) of each tensor
    part,                     # float64 [rows, NCOL]: phase-1 partial sums
    out,                      # float32 [N, NCOL]: the per-tensor sums (written)
    n,                        # N
    NCOL: tl.constexpr,       # columns per partial row
    NCOL_P2: tl.constexpr,    # NCOL rounded up to a power of two (tile width)
    TPB: tl.constexpr,        # tensors per program
    ROWS: tl.constexpr,       # partial rows per tensor summed per iteration
):
    # each program sums TPB tensors side by side (most tensors have one or a few chunks; the
    # interpreter pays per tl op, not per element).  A tensor's summation order depends only on
    # its own chunk count, ROWS and the compiled reduction tree: bitwise reproducible.
    t = tl.program_id(0).to(tl.int64) * TPB + tl.arange(0, TPB)
    tm = t < n
    begin = tl.load(ranges + 2 * t, mask=tm, other=0)
    count = tl.load(ranges + 2 * t + 1, mask=tm, other=0) - begin
    most = block_max(count, 0)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, NCOL_P2)
    acc = tl.full([TPB, ROWS, NCOL_P2], 0, tl.float64)
    for r0 in range(0, most, ROWS):
        r = r0 + rows
        m = (r[None, :] < count[:, None])[:, :, None] & (cols < NCOL)[None, None, :]
        offs = (begin[:, None] + r[None, :])[:, :, None] * NCOL + cols[None, None, :]
        acc += tl.load(part + offs, mask=m, other=0.0)
    tot = block_sum(acc, 1)
    tl.store(out + t[:, None] * NCOL + cols[None, :], tot.to(tl.float32), mask=tm[:, None] & (cols < NCOL)[None, :])


# ---- device helpers of the multi-tensor kernels ------------------------------------------------

@device_function
def chunk_of(chunks, tens, TS: tl.constexpr, CHUNK_SIZE: tl.constexpr):
    """This program's chunk: (pointer to its tensor's row in ``tens``, first element, count)."""
    pid = tl.program_id(0).to(tl.int64)
    row = tens + tl.load(chunks + 2 * pid) * TS
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), CHUNK_SIZE)  # chunk starts are k * CHUNK_SIZE
    count = tl.minimum(tl.load(row + 1) - start, CHUNK_SIZE)
    return row, start, count


@device_function
def role_ptr(row, ROLE: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to the elements of role ROLE of a tensor row, typed as the unsigned integer of the
    element width: loads and stores move raw bits (bit-exact copies; bf16 rounding done by us)."""
    addr = tl.load(row + 2 + ROLE)
    if KIND == 3:
        ptr = addr.to(tl.pointer_type(tl.uint64))
    elif KIND == 0:
        ptr = addr.to(tl.pointer_type(tl.uint32))
    else:
        ptr = addr.to(tl.pointer_type(tl.uint16))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_function
def load_bits(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0)
    else:
        x = tl.load(ptr + offs)
    return x


@device_function
def store_bits(ptr, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x, mask=mask)
    else:
        tl.store(ptr + offs, x)
