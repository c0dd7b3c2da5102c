"""The demo's table (terminal and markdown), demo.json, demo.md and demo.png."""
from __future__ import annotations

import json
import os

from fused_adv._bench import report

TABLE_COLUMNS = [("run", "run"), ("step_ms", "step ms"), ("overhead", "overhead"), ("speedup", "ref/fused time"),
                 ("peak", "peak mem"), ("extra", "vs plain"), ("held", "adv buffers"), ("final_loss", "final loss"),
                 ("val_acc", "clean acc"), ("attacked_acc", "attacked acc"), ("param_diff", "max Δparam vs ref")]


def _acc(mean: float, std: float | None) -> str:
    return f"{100 * mean:.1f}%" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}%"


def table_rows(res: dict) -> list[dict]:
    """One formatted row per run (the cells of :data:`TABLE_COLUMNS`)."""
    rows = []
    for run, r in res["runs"].items():
        c = res["comparisons"].get(run, {})
        ratio = c.get("step_time_ratio_reference_over_fused")
        extra = r["extra_peak_vs_plain_bytes"]
        rows.append({
            "run": run,
            "step_ms": r["median_step_ms"],
            "overhead": None if r["overhead_pct"] is None else f"{r['overhead_pct']:+.0f}%",
            "speedup": f"{ratio:.2f}x" if ratio else "-",
            "peak": report.human_bytes(r["peak_mem_bytes"]) if r["peak_mem_bytes"] is not None else None,
            "extra": None if extra is None else ("+" if extra >= 0 else "-") + report.human_bytes(abs(extra)),
            "held": report.human_bytes(r["adversary_held_bytes"]) if r["adversary_held_bytes"] is not None else "-",
            "final_loss": f"{r['final_loss']:.4f}",
            "val_acc": _acc(r["val_acc"], r["val_acc_std"]),
            "attacked_acc": "-" if r["attacked_acc"] is None else _acc(r["attacked_acc"], r["attacked_acc_std"]),
            "param_diff": f"{c['max_abs_param_diff']:.1e}" if c else "-",
        })
    return rows


def format_table(res: dict, markdown: bool = False) -> str:
    """The table as aligned text, or as a markdown table with ``markdown=True``."""
    return report.format_table(table_rows(res), TABLE_COLUMNS, markdown=markdown)


def describe(res: dict) -> list[str]:
    """The markdown bullet lines that say how the table was made."""
    m = res["meta"]
    o, a = m["optimizer"], m["attack"]
    settings = "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in s.items()) for k, s in m["settings"].items())
    seeds = m["seeds"]
    return [
        f"- {m['params'] / 1e6:.1f}M params; {m['steps']} steps of {m['batch_size']} ({m['train_examples']} training "
        f"examples per seed, grouped by length), max_len {m['max_len']}; {m['val_examples']} held-out validation "
        f"examples (the same for every seed); seeds {seeds}"
        + (" (accuracy columns: mean ± std over seeds)" if len(seeds) > 1 else ""),
        f"- {o['name']} lr {o['lr']} (head {o['head_lr']}), weight decay {o['weight_decay']}, {o['schedule']} ({o['warmup_steps']} warmup "
        f"steps), grad-norm clip {o['clip_grad_norm']}; fused backend {m['backend']} -> {m['resolved_backend']}",
        f"- methods: {settings}" if settings else "- methods: none (plain only)",
        f"- attacked acc: {a['kind']}, eps {a['eps']} per token, {a['steps']} steps of {a['alpha']:.3g}"
        " (the same attack for every run; '-': a reference run, whose weights are its fused run's up to the "
        "max Δparam column, is not attacked again unless --attack-reference)",
        f"- device: {m['device']}; torch {m['versions']['torch']}; {m['date']}; wall {m['wall_seconds']} s "
        f"(model load {m['model_load_seconds']} s); load average at start {m['load_average_start']}, "
        f"at the end {m['load_average']}",
        f"- validation accuracy before training: {100 * m['val_acc_before_training']:.1f}% (chance 50%)",
        f"- step time: {m['timing_note']}; overhead = step time / plain step time - 1; ref/fused time = reference "
        "step time / fused step time",
        f"- peak mem: {m['memory_note']}; adv buffers = bytes the fused adversary keeps between steps",
        "- max Δparam vs ref: largest |weight(reference run) - weight(fused run)| after the last step "
        "(fp32 reordering only; the loss curves overlap)",
    ]


def write_outputs(res: dict, out_dir: str, plot: bool = True) -> list[str]:
    """Writes demo.json, demo.md and (``plot``) demo.png into ``out_dir`` (created if needed);
    returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "demo.json")
    with open(p, "w") as f:
        json.dump(res, f, indent=1, default=str)
    paths.append(p)
    m = res["meta"]
    md = [f"# fused-adv demo — {m['model']} on {m['data']}", "", *describe(res), "",
          format_table(res, markdown=True), ""]
    p = os.path.join(out_dir, "demo.md")
    with open(p, "w") as f:
        f.write("\n".join(md))
    paths.append(p)
    if plot:
        p = os.path.join(out_dir, "demo.png")
        plot_demo(res, p)
        paths.append(p)
    return paths


_COLORS = {"plain": "#444444", "fgm": "#4c72b0", "awp": "#c44e52", "freelb": "#55a868", "pgd": "#8172b2",
           "mifgsm": "#937860", "smart": "#da8bc3", "sift": "#8c8c8c", "sam": "#ccb974"}


def _color(run: str) -> str:
    return _COLORS.get(run.split("-")[0], "#000000")


def plot_demo(res: dict, path: str) -> None:
    """demo.png: (a) clean and attacked validation accuracy per run (bars, seed std as error
    bars), (b) training loss of reference (thick) and fused (dashed on top) runs, (c) |loss(ref) -
    loss(fused)| per step, (d) median step time with the overhead over plain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    names = list(runs)
    m = res["meta"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    ax = axes[0][0]
    x = list(range(len(names)))
    clean = [100 * runs[n]["val_acc"] for n in names]
    att = [100 * (runs[n]["attacked_acc"] or 0) for n in names]
    ce = [100 * (runs[n]["val_acc_std"] or 0) for n in names]
    ae = [100 * (runs[n]["attacked_acc_std"] or 0) for n in names]
    ax.bar([i - 0.2 for i in x], clean, 0.4, yerr=ce, capsize=3, color=[_color(n) for n in names], label="clean")
    ax.bar([i + 0.2 for i in x], att, 0.4, yerr=ae, capsize=3, color=[_color(n) for n in names], alpha=0.45,
           hatch="//", label=f"attacked (eps {m['attack']['eps']}, {m['attack']['steps']} steps)")
    for i, (n, c, a) in enumerate(zip(names, clean, att)):
        ax.annotate(f"{c:.1f}", (i - 0.2, c), ha="center", va="bottom", fontsize=7)
        if runs[n]["attacked_acc"] is not None:
            ax.annotate(f"{a:.1f}", (i + 0.2, a), ha="center", va="bottom", fontsize=7)
    att_known = [a for n, a in zip(names, att) if runs[n]["attacked_acc"] is not None]
    ax.axhline(50, color="k", lw=0.8, ls=":", label="chance")
    ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("validation accuracy (%)")
    lo = min(clean + att_known + [50])
    ax.set_ylim(max(0, lo - 10), 105)
    nseeds = len(m["seeds"])
    ax.set_title("clean vs attacked accuracy" + (f" (mean ± std, {nseeds} seeds)" if nseeds > 1 else ""))
    ax.legend(fontsize=7, loc="upper right", ncol=3)

    ax = axes[0][1]
    for run, r in runs.items():
        fused = run.endswith("fused")
        ax.plot(range(len(r["losses"])), r["losses"], color=_color(run), lw=1.0 if fused else 3.0,
                ls="--" if fused else "-", alpha=1.0 if fused else 0.35, label=run)
    ax.set_title(f"training loss, seed {m['seeds'][0]} (reference: thick, fused: dashed on top)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1][0]
    for fused, c in res["comparisons"].items():
        lr, lf = runs[c["reference"]]["losses"], runs[fused]["losses"]
        d = [max(abs(a - b), 1e-12) for a, b in zip(lr, lf)]
        ax.semilogy(range(len(d)), d, color=_color(fused), label=f"{fused} vs {c['reference']}")
    ax.set_title("|loss(reference) - loss(fused)| per step (1e-12 = identical)")
    ax.set_xlabel("step")
    if res["comparisons"]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no reference runs here\n(--runs with '<method>' runs both)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)

    ax = axes[1][1]
    ms = [runs[n]["median_step_ms"] or 0 for n in names]
    bars = ax.bar(names, ms, color=[_color(n) for n in names], alpha=0.9)
    for b, n in zip(bars, names):
        if n.endswith("reference"):
            b.set_hatch("..")
        o = runs[n]["overhead_pct"]
        if o is not None and n != "plain":
            ax.annotate(f"{o:+.0f}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=7)
    ax.set_title("median step time (ms; dotted: reference), overhead over plain")
    ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    for lab in ax.get_xticklabels():
        lab.set_ha("right")
    fig.suptitle(f"fused-adv demo — {m['model']}, {m['steps']} steps x {m['batch_size']}, seeds {m['seeds']} — "
                 f"{m['device']} — {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
