"""Measurements: step time, copy bandwidth, minimum bytes, peak extra memory, host syncs.

* Time: each repetition runs ``reset()`` (untimed), flushes the L2 cache on CUDA (a 256 MB
  write, larger than any current L2), then times ``step()`` alone: CUDA events on GPU,
  ``time.perf_counter`` on CPU.  The median is reported.
* Copy bandwidth: ``dst.copy_(src)`` of as many bytes as the step's perturbed tensors, timed the
  same way in the same run: read + write = 2 x bytes.  It is the ceiling the fused passes are
  judged against (docs/design.md §7 (Targets): >= 85% on tensors >= 64 MB).
* Minimum bytes (docs/design.md §3 (Op contract)), in tensor-sized passes over the perturbed tensors, one step:
    FGM   reduction (read G) + update (read P, G; write B, P) + restore (read B; write P) = 7
    FGSM  update (read P, G; write B, P) + restore = 6
    PGD-3 step 0: 1 + 4; steps 1, 2: reduction (read P, B, G) + update (read P, G, B; write P)
          = 7 each; restore 2; gradient backup set aside, no copy: 21
    AWP   reduction (read G, P) + update (read P, G; write B, P) + restore = 8 (adv_step = 1)
    MI-FGSM-3  step 0: reduction (read G) + update (read P, G; write B, M, P) = 6; steps 1, 2:
          1 + update (read P, G, M, B; write M, P) = 7 each; restore 2; grads set aside: 22
    AWP (paper)  calc_awp's reduction (read W, D) + perturb (read W, D; write W) + restore
          (same) = 8; D is the gradient the backward wrote (model work, not counted)
  Full passes are counted even though the word-embedding gradient is row-sparse (see
  ParamModel): a kernel that skips stores of unchanged rows can exceed 100% of the copy rate.
* Peak extra memory: CUDA ``max_memory_allocated`` over building the adversary and two steps,
  minus what was allocated before.  On CPU (no allocator statistics) :class:`StorageTracker`
  follows every tensor storage created by a dispatched op or already held by the model, with a
  finalizer on each, and records the peak of the live total.  Scratch memory allocated inside a
  compiled kernel is not seen on CPU (it is on CUDA).
* Host syncs: ``torch.cuda.set_sync_debug_mode('warn')`` over one step, warnings counted.  CPU
  has no host/device boundary: reported as None (n/a).
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fused_adv._bench.shapes import ShapeSet

METHODS = ("fgm", "fgsm", "pgd3", "awp", "mifgsm", "awp_paper")
METHOD_LABELS = {"fgm": "FGM", "fgsm": "FGSM", "pgd3": "PGD-3", "awp": "AWP", "mifgsm": "MI-FGSM-3",
                 "awp_paper": "AWP (paper)"}
# Which parameters each method perturbs (substring of the name, as the community classes; the
# paper's AWP also requires dim > 1, see perturbed_numel).
METHOD_PATTERN = {"fgm": "word_embeddings", "fgsm": "word_embeddings", "pgd3": "word_embeddings",
                  "awp": "weight", "mifgsm": "word_embeddings", "awp_paper": "weight"}
MIN_PASSES = {"fgm": 7, "fgsm": 6, "pgd3": 21, "awp": 8, "mifgsm": 22, "awp_paper": 8}
# Methods whose restore puts the weights back bit for bit (the paper's AWP subtracts gamma*diff
# from the weights: w + g*d - g*d, exact only up to rounding, by design).
RESTORE_EXACT = {m: m != "awp_paper" for m in METHODS}


def min_bytes(method: str, shape_set: ShapeSet, dtype: torch.dtype) -> int:
    """The fewest bytes one bookkeeping step must move (see the module docstring)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return MIN_PASSES[method] * perturbed_numel(method, shape_set) * elem


def perturbed_numel(method: str, shape_set: ShapeSet) -> int:
    """Elements of the parameters ``method`` perturbs in ``shape_set``."""
    if method == "awp_paper":  # 'weight' in the name and dim > 1 (docs/methods.md §4b (AWP (paper)))
        return sum(math.prod(s) for n, s in shape_set.params if "weight" in n and len(s) > 1)
    return shape_set.numel_matching(METHOD_PATTERN[method])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flusher:
    def __init__(self, device: torch.device):
        self.buf = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def time_step(step: Callable[[], object], reset: Callable[[], object] | None, device: torch.device, *,
              warmup: int = 2, reps: int = 10, max_seconds: float | None = None) -> list[float]:
    """Seconds per call of ``step`` (``reset`` runs untimed before each call)."""
    device = torch.device(device)
    flush = _L2Flusher(device)
    for _ in range(warmup):
        if reset is not None:
            reset()
        step()
    synchronize(device)
    times: list[float] = []
    t_start = time.perf_counter()
    if device.type == "cuda":
        pairs = []
        for _ in range(reps):
            if reset is not None:
                reset()
            flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in pairs]
    else:
        for i in range(reps):
            if reset is not None:
                reset()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            if max_seconds is not None and i >= 2 and time.perf_counter() - t_start > max_seconds:
                break
    return times


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def copy_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, *, reps: int = 10,
                   max_seconds: float | None = None) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``numel`` elements (read + write counted)."""
    device = torch.device(device)
    src = torch.ones(max(numel, 1), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t = median(time_step(lambda: dst.copy_(src), None, device, warmup=2, reps=reps, max_seconds=max_seconds))
    return 2 * src.numel() * src.element_size() / t


def count_host_syncs(step: Callable[[], object], device: torch.device) -> int | None:
    """Synchronizing CUDA calls made by one ``step()``; None on CPU (no host/device boundary)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


class StorageTracker(TorchDispatchMode):
    """Peak bytes of live tensor storage, for devices without allocator statistics (CPU).

    Inside ``with tracker:`` every tensor returned by a dispatched op has its storage followed;
    ``tracker.hold(tensors)`` follows storages that existed before (the model's weights and
    grads), so that a storage dropped during the step (the community classes re-point
    ``param.data`` at the backup and the old storage dies) is subtracted when it dies.
    ``peak - baseline`` is the peak extra memory.  Storage Python objects are preserved while
    the C++ storage lives, so a weakref finalizer on one fires exactly when the memory is freed.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.baseline = 0

    def _follow(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            s = t.untyped_storage()
        except Exception:  # tensor subclasses / sparse: not followed
            return
        key = id(s)
        if key in self._live:
            return
        n = s.nbytes()
        self._live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(s, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if t is not None:
                self._follow(t)
        self.baseline = self.current
        self.peak = self.current

    @property
    def extra_peak(self) -> int:
        return self.peak - self.baseline

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._follow(t)
        return out


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        out.append(p)
        if p.grad is not None:
            out.append(p.grad)
    return out


def peak_extra_memory(case, model: torch.nn.Module, device: torch.device, steps: int = 2) -> int:
    """Peak bytes allocated above what existed before the first step of a freshly built
    ``case`` (a :class:`~fused_adv._bench.providers.Case`), over ``steps`` steps: the first
    step allocates what the adversary keeps between steps, the second shows the steady state.
    The model's weights and grads and the case's stand-in gradients are not counted."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            if case.reset is not None:
                case.reset()
            case.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = StorageTracker()
    with tracker:
        tracker.hold(model_tensors(model) + list(case.held))
        for _ in range(steps):
            if case.reset is not None:
                case.reset()
            case.step()
    return tracker.extra_peak
