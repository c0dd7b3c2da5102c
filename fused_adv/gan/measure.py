"""What the GAN losses cost per step against the networks' forward/backward (the measurement behind
docs/methods.md §9 (GAN with probability-ratio clipping): whether a fused kernel pays).

    python -m fused_adv.gan.measure [--batch-size 64 --hidden 128 --reps 200 --out DIR]

For the generator step (G forward, ratio classifier + critic forward, ``ppo_generator_loss``,
backward, Adam step) and the critic step (two critic forwards, ``reweighted_fake_term``, the
gradient penalty with its double backward, Adam step) on the demo's networks it reports

* kernels: the leaf ATen ops the profiler records (on the CPU each is one kernel; on a GPU each
  would be one launch), for the whole step and for the loss alone (forward + backward on leaf
  tensors of the same shapes);
* time: the median of ``--reps`` interleaved repetitions of the step and of the loss alone, eager
  and under ``torch.compile`` (inductor, fullgraph: the loss becomes one generated kernel per
  direction, which is what a hand-fused kernel would be).

The loss works on (B, 1) tensors whatever the networks, so the demo's small MLPs are the case most
favourable to fusing; writes gan_loss_measure.{json,md} to ``--out`` when given.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fused_adv.gan.demo import Critic, Generator, RatioClassifier
from fused_adv.gan.losses import frozen_p_old, ppo_generator_loss, reweighted_fake_term
from fused_adv.gan.train import PPOGAN, PPOGANConfig, make_optimizers


#: leaf ATen ops that launch no compute (allocation, views, no-op conversions)
_NOT_KERNELS = {"aten::" + n for n in ("empty", "empty_strided", "empty_like", "as_strided", "view", "_reshape_alias",
                                       "reshape", "expand", "detach", "alias", "t", "transpose", "to", "lift_fresh",
                                       "resolve_conj", "resolve_neg", "squeeze", "unsqueeze", "permute", "select",
                                       "slice", "unbind", "split", "set_")}


def _leaf_aten_ops(fn) -> int:
    """Kernels ``fn()`` runs, forward and backward: the leaf ATen ops (no ATen op below them) the
    profiler records, less allocations and views."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    evts = prof.events()
    aten = sum(1 for e in evts if e.name.startswith("aten::") and e.name not in _NOT_KERNELS
               and not any(c.name.startswith("aten::") for c in e.cpu_children))
    # inductor's generated kernels (named by the profiler with cpp.enable_kernel_profile)
    generated = sum(1 for e in evts if "cpp_fused_" in e.name or e.name.startswith("triton_"))
    return aten + generated


def _median_us(fns: dict, reps: int) -> dict:
    """Median wall time in µs of each callable, repetitions interleaved (a shared machine's load
    then hits every candidate alike)."""
    for f in fns.values():
        for _ in range(5):
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(batch_size: int = 64, hidden: int = 128, nz: int = 32, reps: int = 200, compile_loss: bool = True) -> dict:
    torch.manual_seed(0)
    G, C, D = Generator(nz, hidden), Critic(hidden), RatioClassifier(hidden)
    cfg = PPOGANConfig(nz=nz)
    gan = PPOGAN(G, C, D, *make_optimizers(G, C, D, cfg), cfg)
    real = torch.rand(batch_size, 64) * 2 - 1
    z = torch.randn(batch_size, nz)
    with torch.no_grad():
        p_old = frozen_p_old(D(G(z)))

    # the loss alone, forward + backward, on leaf tensors shaped like the networks' outputs
    d_new = (torch.rand(batch_size, 1) * 0.9 + 0.05).requires_grad_()
    adv = torch.randn(batch_size, 1, requires_grad=True)
    fake_scores = torch.randn(batch_size, 1, requires_grad=True)

    def g_loss(fn=ppo_generator_loss):
        fn(d_new, p_old, adv).backward()

    def c_term(fn=reweighted_fake_term):
        fn(fake_scores).backward()

    fns = {"generator_step": lambda: gan.generator_step(z, p_old), "generator_loss": g_loss,
           "critic_step": lambda: gan.critic_step(real), "critic_fake_term": c_term}
    kernels = {k: _leaf_aten_ops(f) for k, f in fns.items()}
    if compile_loss:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # the generated kernels show in the profile
        g_c = torch.compile(ppo_generator_loss, fullgraph=True)
        c_c = torch.compile(reweighted_fake_term, fullgraph=True)
        fns["generator_loss_compiled"] = lambda: g_loss(g_c)
        fns["critic_fake_term_compiled"] = lambda: c_term(c_c)
        for k in ("generator_loss_compiled", "critic_fake_term_compiled"):
            fns[k]()  # compile outside the timing
            kernels[k] = _leaf_aten_ops(fns[k])
    times = _median_us(fns, reps)
    # a whole round (diters critic + ppo_iters ratio-classifier and generator steps), fewer reps
    round_us = _median_us({"round": lambda: gan.train_step(lambda: real)}, max(3, reps // 10))["round"]
    losses_per_round_us = cfg.diters * times["critic_fake_term"] + cfg.ppo_iters * times["generator_loss"]
    rows = []
    for step, loss in (("generator_step", "generator_loss"), ("critic_step", "critic_fake_term")):
        row = {"step": step, "step_kernels": kernels[step], "step_us": times[step], "loss": loss,
               "loss_kernels": kernels[loss], "loss_us": times[loss],
               "loss_share_of_step": times[loss] / times[step]}
        if compile_loss:
            row["loss_compiled_kernels"] = kernels[loss + "_compiled"]
            row["loss_compiled_us"] = times[loss + "_compiled"]
            row["saving_if_fused_share_of_step"] = (times[loss] - times[loss + "_compiled"]) / times[step]
        rows.append(row)
    return {"batch_size": batch_size, "hidden": hidden, "nz": nz, "reps": reps, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": rows, "round_us": round_us,
            "losses_per_round_us": losses_per_round_us, "losses_share_of_round": losses_per_round_us / round_us}


def markdown(res: dict) -> str:
    out = [f"B = {res['batch_size']}, hidden {res['hidden']}, {res['threads']} thread(s), torch {res['torch']}, "
           f"median of {res['reps']} interleaved reps", "",
           "| step | step: kernels / µs | loss | loss eager: kernels / µs (share of step) "
           "| loss compiled: kernels / µs | saving if fused (share of step) |",
           "|---|---:|---|---:|---:|---:|"]
    for r in res["rows"]:
        comp = (f"{r['loss_compiled_kernels']} / {r['loss_compiled_us']:.0f}" if "loss_compiled_us" in r else "n/a")
        save = (f"{100 * r['saving_if_fused_share_of_step']:.1f}%" if "loss_compiled_us" in r else "n/a")
        out.append(f"| {r['step']} | {r['step_kernels']} / {r['step_us']:.0f} | {r['loss']} | "
                   f"{r['loss_kernels']} / {r['loss_us']:.0f} ({100 * r['loss_share_of_step']:.1f}%) "
                   f"| {comp} | {save} |")
    out += ["", "A round (Diters critic + PPO_iters ratio-classifier and generator steps): "
            f"{res['round_us'] / 1e3:.1f} ms; "
            f"the eager losses in it: {res['losses_per_round_us'] / 1e3:.2f} ms "
            f"({100 * res['losses_share_of_round']:.1f}%)."]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_adv.gan.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = measure(a.batch_size, a.hidden, reps=a.reps, compile_loss=not a.no_compile)
    md = markdown(res)
    print(md)
    if a.out:
        from fused_adv._bench import report

        res.update(date=report.utc_now(), cpu=report.cpu_name(), load_average=report.load_average())
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gan_loss_measure.json").write_text(json.dumps(res, indent=1))
        (out / "gan_loss_measure.md").write_text(f"# GAN loss cost per step ({res['date']}, {res['cpu']})\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
