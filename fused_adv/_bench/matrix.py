"""The bookkeeping benchmark matrix behind ``fused-adv bench``: run every (parameter set, dtype)
x method x provider case, then format and write the results.

Per case (see :mod:`fused_adv._bench.measure` for how each is measured): median step time,
achieved GB/s against the minimum bytes of docs/design.md §3 (Op contract), % of the copy
bandwidth measured in the same run, peak extra memory, host syncs per step.  :func:`run` returns
``{"meta": ..., "rows": [...]}``; :func:`write_results` writes results.json, results.md and
results.png.
"""
from __future__ import annotations

import gc
import json
import os
import time

import torch

from fused_adv._bench import measure, report
from fused_adv._bench.measure import METHOD_LABELS, METHODS
from fused_adv._bench.providers import PROVIDERS, build_case
from fused_adv._bench.shapes import CPU_DEFAULT, DTYPES, GPU_DEFAULT, SHAPE_SETS, SMOKE, ParamModel, dtype_name

TABLE_COLUMNS = [("case", "set/dtype"), ("method", "method"), ("provider", "provider"),
                 ("median_ms", "median ms"), ("speedup", "x ref"), ("gbps", "GB/s"),
                 ("pct_copy", "% copy"), ("extra_mem", "extra mem"), ("mem_ratio", "x weights"),
                 ("host_syncs", "syncs")]


def parse_sets(spec: str | None, device: torch.device, smoke: bool) -> list[tuple[str, torch.dtype]]:
    """``SET[:DTYPE],...`` -> [(set name, dtype)] (both fp32 and bf16 when a dtype is omitted);
    the toy set for ``smoke``; the device's default sets for an empty spec.  Raises SystemExit
    naming the choices for an unknown set or dtype."""
    if smoke:
        return list(SMOKE)
    if not spec:
        return list(GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, dt = item.partition(":")
        if name not in SHAPE_SETS:
            raise SystemExit(f"unknown parameter set {name!r}; choose from {', '.join(SHAPE_SETS)}")
        dts = [dt] if dt else ["fp32", "bf16"]
        for d in dts:
            if d not in DTYPES:
                raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
            out.append((name, DTYPES[d]))
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(device: str | torch.device = "cpu", sets=None, methods=None, providers=None, *, reps: int | None = None,
        warmup: int = 2, max_seconds: float | None = None, memory: bool = True, syncs: bool = True,
        progress: bool = True, seed: int = 0) -> dict:
    """Runs the matrix; returns ``{"meta": ..., "rows": [...]}`` (see write_results)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    sets = sets if sets is not None else parse_sets(None, device, False)
    methods = list(methods or METHODS)
    provider_names = list(providers or PROVIDERS)
    for n in provider_names:
        if n not in PROVIDERS:
            raise SystemExit(f"unknown provider {n!r}; choose from {', '.join(PROVIDERS)}")
    if reps is None:
        reps = 20 if device.type == "cuda" else 10
    if max_seconds is None and device.type == "cpu":
        max_seconds = 4.0  # per case: the slow community AWP on MiniLM stops after a few reps

    plan = []
    skipped = {}
    for set_name, dtype in sets:
        for method in methods:
            for pname in provider_names:
                why = PROVIDERS[pname].why_not(device, method)
                if why is None:
                    plan.append((set_name, dtype, method, pname))
                else:
                    skipped[pname] = why
    rows: list[dict] = []
    errors: list[dict] = []
    copy_cache: dict[tuple[int, torch.dtype], float] = {}
    bar = tqdm(total=len(plan), desc="fused-adv bench", unit="case", disable=not progress)
    t_start = time.perf_counter()
    current_model = None
    for set_name, dtype, method, pname in plan:
        key = (set_name, dtype)
        if current_model is None or current_model[0] != key:
            current_model = None
            _free(device)
            current_model = (key, ParamModel(SHAPE_SETS[set_name], dtype, device, seed=seed))
        model = current_model[1]
        provider = PROVIDERS[pname]
        bar.set_postfix_str(f"{set_name}/{dtype_name(dtype)} {METHOD_LABELS[method]} {pname}")
        try:
            rows.append(_measure_case(set_name, dtype, method, provider, model, device, copy_cache, reps=reps,
                                      warmup=warmup, max_seconds=max_seconds, memory=memory, syncs=syncs))
        except Exception as exc:  # one broken provider must not lose the rest of a long GPU run
            errors.append({"case": f"{set_name}/{dtype_name(dtype)}", "method": METHOD_LABELS[method],
                           "provider": pname, "error": f"{type(exc).__name__}: {exc}"[:500]})
            bar.write(f"error: {set_name}/{dtype_name(dtype)} {METHOD_LABELS[method]} {pname}: "
                      f"{type(exc).__name__}: {exc}")
            current_model = None  # its weights/grads may be left perturbed: rebuild
        bar.update(1)
    bar.close()
    current_model = None
    _free(device)
    # speedup against the community class of the same case and method
    ref = {(r["case"], r["method"]): r["median_ms"] for r in rows if r["provider"] == "reference"}
    for r in rows:
        base = ref.get((r["case"], r["method"]))
        r["speedup"] = None if base is None else base / r["median_ms"]
    meta = {
        "device": report.device_name(device), "device_type": device.type,
        "device_slug": report.device_slug(device), "date": report.utc_now(),
        "versions": report.versions(), "backends": report.backends_summary(device),
        "providers_skipped": skipped, "errors": errors, "reps": reps, "warmup": warmup, "max_seconds_per_case": max_seconds,
        "wall_seconds": round(time.perf_counter() - t_start, 1), "load_average": report.load_average(),
        "sets": {f"{n}/{dtype_name(d)}": {"params": SHAPE_SETS[n].numel, "tensors": len(SHAPE_SETS[n].params),
                                          "note": SHAPE_SETS[n].note} for n, d in sets},
        "notes": {
            "step": "bookkeeping only (forward/backward excluded): FGM/FGSM attack+restore; PGD-3 "
                    "backup_grad + 3 attacks + restore_grad + restore; AWP attack_backward with a free "
                    "forward/backward (save, perturb, restore)",
            "gbps": "minimum bytes of docs/design.md §3 (Op contract) (full passes) / median time",
            "grads": "N(0, 1e-3); the word-embedding gradient is nonzero on 2048 random rows only (a batch's "
                     "distinct tokens), as in real fine-tuning",
            "pct_copy": "achieved GB/s / GB/s of a plain tensor copy of the perturbed bytes, same run",
            "extra_mem": ("torch.cuda.max_memory_allocated above the pre-adversary level, over building "
                          "the adversary and 2 steps" if device.type == "cuda" else
                          "peak live tensor storage above the model's own (StorageTracker), over building "
                          "the adversary and 2 steps"),
            "mem_ratio": "extra memory / bytes of the perturbed weights",
            "host_syncs": "torch.cuda.set_sync_debug_mode('warn') warnings in one step; n/a on CPU",
        },
    }
    return {"meta": meta, "rows": rows}


def _measure_case(set_name, dtype, method, provider, model, device, copy_cache, *, reps, warmup, max_seconds,
                  memory, syncs) -> dict:
    shape_set = SHAPE_SETS[set_name]
    pname = provider.name
    numel = measure.perturbed_numel(method, shape_set)
    if (numel, dtype) not in copy_cache:
        copy_cache[(numel, dtype)] = measure.copy_bandwidth(numel, dtype, device, reps=reps,
                                                            max_seconds=max_seconds)
    copy_bps = copy_cache[(numel, dtype)]
    weight_bytes = numel * torch.empty((), dtype=dtype).element_size()

    extra = None
    if memory:
        _free(device)
        extra = measure.peak_extra_memory(build_case(method, provider, model), model, device)
        _free(device)
    case = build_case(method, provider, model)
    times = measure.time_step(case.step, case.reset, device, warmup=warmup, reps=reps,
                              max_seconds=max_seconds)
    n_syncs = None
    if syncs:
        if case.reset is not None:
            case.reset()
        n_syncs = measure.count_host_syncs(case.step, device)
    if case.reset is not None:
        case.reset()
    del case
    med = measure.median(times)
    mbytes = measure.min_bytes(method, shape_set, dtype)
    return {
        "set": set_name, "dtype": dtype_name(dtype), "case": f"{set_name}/{dtype_name(dtype)}",
        "method": METHOD_LABELS[method], "method_key": method, "provider": pname,
        "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "reps": len(times),
        "min_bytes": mbytes, "gbps": mbytes / med / 1e9, "copy_gbps": copy_bps / 1e9,
        "pct_copy": 100.0 * (mbytes / med) / copy_bps,
        "perturbed_params": numel, "perturbed_bytes": weight_bytes,
        "extra_mem_bytes": extra, "extra_mem": report.human_bytes(extra),
        "mem_ratio": None if extra is None or weight_bytes == 0 else extra / weight_bytes,
        "host_syncs": n_syncs,
    }


def format_results(results: dict, *, markdown: bool = False) -> str:
    """The rows of :func:`run`'s result as a plain-text (or markdown) table."""
    return report.format_table(results["rows"], TABLE_COLUMNS, markdown=markdown)


def write_results(results: dict, out_dir: str, *, plot: bool = True) -> list[str]:
    """Writes results.json, results.md and (``plot``) results.png into ``out_dir`` (created);
    returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    meta = results["meta"]
    paths = []
    p = os.path.join(out_dir, "results.json")
    with open(p, "w") as f:
        json.dump(results, f, indent=1, default=str)
    paths.append(p)
    v = meta["versions"]
    md = [f"# fused_adv bookkeeping benchmark — {meta['device']}", "",
          f"- date: {meta['date']}",
          f"- versions: python {v['python']}, torch {v['torch']}, triton {v['triton']}, "
          f"fused_adv {v['fused_adv']} (commit {v.get('git_commit')})",
          f"- backends: " + ", ".join(f"{b}: {s}" for b, s in meta["backends"].items()),
          f"- errors: " + ("; ".join(f"{e['case']} {e['method']} {e['provider']}: {e['error']}" for e in meta["errors"])
                            or "none"),
          f"- providers not run: " + (", ".join(f"{k} ({w})" for k, w in meta["providers_skipped"].items())
                                      or "none"),
          f"- reps per case: {meta['reps']} (CPU cap {meta['max_seconds_per_case']} s per case), "
          f"wall time {meta['wall_seconds']} s, load average at the end {meta['load_average']}", ""]
    md += [f"- {k}: {t}" for k, t in meta["notes"].items()]
    md += ["", format_results(results, markdown=True), ""]
    p = os.path.join(out_dir, "results.md")
    with open(p, "w") as f:
        f.write("\n".join(md))
    paths.append(p)
    if plot and results["rows"]:
        p = os.path.join(out_dir, "results.png")
        plot_results(results, p)
        paths.append(p)
    return paths


def plot_results(results: dict, path: str) -> None:
    """Bar chart of the median step time per case, method and provider (log scale) to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    colors = {"reference": "#888888", "compile": "#bbbbbb", "foreach": "#8172b3", "torch": "#4c72b0", "cpp": "#dd8452",
              "triton": "#55a868", "cuda": "#c44e52"}
    for ax, case in zip(axes[0], cases):
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, m in enumerate(methods):
                hit = [r for r in rows if r["case"] == case and r["method"] == m and r["provider"] == prov]
                if hit:
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(hit[0]["median_ms"])
            ax.bar(xs, ys, width, label=prov, color=colors.get(prov))
        ax.set_xticks(range(len(methods)), methods)
        ax.set_yscale("log")
        ax.set_title(case, fontsize=10)
        ax.set_ylabel("median ms per step (log)")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"fused_adv bookkeeping per step — {meta['device']} — torch {meta['versions']['torch']} — "
                 f"{meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
