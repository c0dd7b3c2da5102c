"""CPU timings of the fused activation-space ops against the reference code they replace
(``python benchmarks/bench_activation_cpu.py`` runs :func:`main`).

    python benchmarks/bench_activation_cpu.py [--shape 8 128 384] [--threads 1] [--backends cpp torch]

Each row times one step of a method's bookkeeping at an activation shape [B, T, H] (fp32 by
default): the reference code exactly as fused_adv.reference.* runs it (host syncs included) vs the
fused ops on each available CPU backend.  Fastest single call (see median_us).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fused_adv.ops import activation as A
from fused_adv.ops import free as FR
from fused_adv.ops import why_not
from fused_adv.reference.freeat import FreeAT as RefFreeAT
from fused_adv.reference.freelb import FreeLB as RefFreeLB
from fused_adv.reference.yopo import YOPO as RefYOPO


def median_us(fn, min_run_time=0.5):
    """Fastest single call, µs (after a warm-up), over ``min_run_time`` seconds of calls: on a
    shared, loaded 2-core machine medians varied 2-5x between runs, the minimum did not."""
    for _ in range(3):
        fn()
    best, spent = float("inf"), 0.0
    while spent < min_run_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best * 1e6


def cases(shape, dtype, backend):
    """[(label, reference step, fused step)] at activation shape ``shape`` = [B, T, H]."""
    b, t, h = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    xhat = F.layer_norm(x, (h,), eps=1e-7)
    delta = torch.randn(shape, generator=g) * 1e-2
    grad = torch.randn(shape, generator=g) * 1e-3
    dy = torch.randn(shape, generator=g).to(dtype)
    lr, sigma = 1e-4, 1e-2

    def ref_ln_fwd():
        return F.layer_norm(x, (h,), eps=1e-7)

    def fused_ln_fwd():
        return A.ln_delta_fwd(x, None, 1e-7, backend=backend)

    xr = x.clone().requires_grad_()

    def ref_ln_fwd_bwd():
        F.layer_norm(xr, (h,), eps=1e-7).backward(dy)
        xr.grad = None

    def fused_ln_fwd_bwd():
        A.ln_delta(xr, None, 1e-7, backend=backend).backward(dy)
        xr.grad = None

    def ref_sift_init():  # PerturbationLayer.update_delta, first call
        noise = xhat.new(xhat.size()).normal_(0, sigma).float()
        d = torch.clamp(noise, -2 * sigma, 2 * sigma)
        return (xhat.to(d).detach() + d).to(xhat)

    def fused_sift_init():
        noise = xhat.new(xhat.size()).normal_(0, sigma)
        return A.sift_perturb(xhat, noise, 2 * sigma, backend=backend)

    def ref_sift_update():  # PerturbationLayer.update_delta, ascent step (host read of ‖g‖)
        norm = grad.norm()
        if torch.isnan(norm) or torch.isinf(norm):
            return None
        d = delta + lr * grad / (1e-6 + grad.abs().max(-1, keepdim=True)[0])
        return (xhat.to(d).detach() + d).to(xhat)

    dwork = delta.clone()

    def fused_sift_update():
        return A.sift_update_(dwork, grad, xhat, None, lr, backend=backend)

    noise0 = (torch.randn(shape, generator=g) * 1e-5).to(dtype)
    sgrad = grad.to(dtype)

    def ref_smart():  # SMART ascent step (mt-dnn)
        norm = sgrad.norm()
        if torch.isnan(norm) or torch.isinf(norm):
            return 0
        v = noise0 + sgrad * 1e-3
        return v / (v.abs().max(-1, keepdim=True)[0] + 1e-6)

    nwork = noise0.clone()

    def fused_smart():
        return A.smart_update_(nwork, sgrad, None, 1e-3, 1e-6, backend=backend)

    ref_l2 = RefFreeLB(adv_lr=0.1, adv_max_norm=1.0, adv_norm_type="l2")
    ref_linf = RefFreeLB(adv_lr=0.1, adv_max_norm=0.01, adv_norm_type="linf")
    fdelta = delta.to(dtype)
    fgrad = grad.to(dtype)
    fwork = fdelta.clone()

    def fused_freelb(linf, mx):
        def run():
            A.freelb_update_(fwork, fgrad, None, 0.1, mx, linf, backend=backend)
        return run

    # FreeAT (docs/methods.md §8): the original's sign step on the persistent buffer, the NLP
    # variant's per-sample L2 step; YOPO's inner step (the same op pair as FreeLB l2)
    ref_sign = RefFreeAT(adv_lr=1e-3, adv_max_norm=1e-2)
    ref_sign.noise = fdelta.clone()
    swork = fdelta.clone()

    def fused_sign():
        FR.freeat_update_(swork, fgrad, 1e-3, 1e-2, backend=backend)

    ref_at_l2 = RefFreeAT(adv_norm_type="l2", adv_lr=0.1, adv_max_norm=1.0)

    def ref_freeat_l2():
        ref_at_l2.noise = fdelta
        ref_at_l2._update(fgrad)

    ref_yopo = RefYOPO(adv_lr=0.1, adv_max_norm=1.0)

    return [
        ("LayerNorm fwd (no affine)", ref_ln_fwd, fused_ln_fwd),
        ("LayerNorm fwd+bwd", ref_ln_fwd_bwd, fused_ln_fwd_bwd),
        ("SiFT delta init + perturbed input", ref_sift_init, fused_sift_init),
        ("SiFT delta step + perturbed input", ref_sift_update, fused_sift_update),
        ("SMART noise step (linf normalise)", ref_smart, fused_smart),
        ("FreeLB l2 step + projection", lambda: ref_l2.update_delta(fdelta, fgrad), fused_freelb(False, 1.0)),
        ("FreeLB linf step + clamp", lambda: ref_linf.update_delta(fdelta, fgrad), fused_freelb(True, 0.01)),
        ("FreeAT sign step + clamp (buffer)", lambda: ref_sign._update(fgrad), fused_sign),
        ("FreeAT l2 step + projection", ref_freeat_l2, fused_freelb(False, 1.0)),
        ("YOPO inner step + projection", lambda: ref_yopo.update_delta(fdelta, fgrad), fused_freelb(False, 1.0)),
    ]


def main(argv=None) -> None:
    """Parses ``argv`` (default: sys.argv[1:]), times every case on each available CPU backend,
    prints the fastest call per case and the speed-up over the reference."""
    ap = argparse.ArgumentParser(prog="bench_activation_cpu.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[8, 128, 384])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--backends", nargs="+", default=["cpp", "torch"])
    ap.add_argument("--min-run-time", type=float, default=0.5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    backends = [b for b in args.backends if why_not(b, torch.device("cpu"), "ln_delta_fwd") is None]
    print(f"shape {args.shape} {args.dtype}, {args.threads} thread(s), torch {torch.__version__}; fastest call, µs")
    header = f"{'op':36s} {'reference':>10s}" + "".join(f" {b:>10s} {'speedup':>8s}" for b in backends)
    print(header)
    rows = {}
    for b in backends:
        for name, ref, fused in cases(tuple(args.shape), dtype, b):
            rows.setdefault(name, {"reference": median_us(ref, args.min_run_time)})[b] = median_us(fused, args.min_run_time)
    for name, r in rows.items():
        line = f"{name:36s} {r['reference']:10.1f}"
        for b in backends:
            line += f" {r[b]:10.1f} {r['reference'] / r[b]:7.2f}x"
        print(line)
