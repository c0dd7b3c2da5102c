"""One benchmark chunk of tools/gpu_session.sh, then everything so far merged (docs/gpu.md).

    python tools/gpu_bench.py --merged DIR --chunks CHUNK_DIR... -- FUSED_ADV_BENCH_ARGS

Runs ``fused-adv bench`` with FUSED_ADV_BENCH_ARGS (its own parser and ``main_args``; ``--out``
names this chunk's folder; providers the registry does not have are dropped, with a note, so the
same session script works before and after a provider lands), then merges the results.json of
every CHUNK_DIR that has one into DIR: results.json, results.md (the bench's table, then a
headline table) and results.png through ``fused_adv.bench.write_results``, with the speed-ups
recomputed across chunks: ``speedup`` over the community class (reference), and
``speedup_vs_compile`` / ``speedup_vs_foreach`` over torch.compile of it and the foreach rewrite,
same case and method.  The session runs the matrix in chunks, one process each, so that a run cut
short keeps every chunk finished before the cut and a broken CUDA context dies with its chunk.
Exit status: the bench's, or 1 when no chunk has results.
"""
from __future__ import annotations

import json
import os
import sys

BASELINES = ("reference", "compile", "foreach")  # what the fused backends are compared with


def merge(chunk_dirs: list[str]) -> dict:
    """``{"meta", "rows"}`` of all chunks: the first chunk's meta with errors, skipped providers,
    sets and wall time combined, and each chunk's date and wall time under ``meta["chunks"]``."""
    chunks = []
    for d in chunk_dirs:
        p = os.path.join(d, "results.json")
        if os.path.exists(p):
            with open(p) as f:
                chunks.append((d, json.load(f)))
    if not chunks:
        raise SystemExit(f"gpu_bench_merge: no results.json in {', '.join(chunk_dirs)}")
    meta = dict(chunks[0][1]["meta"])
    meta.update(errors=[], providers_skipped={}, sets={}, wall_seconds=0.0, chunks=[])
    rows = []
    for d, c in chunks:
        m = c["meta"]
        rows += c["rows"]
        meta["errors"] += m.get("errors", [])
        meta["providers_skipped"].update(m.get("providers_skipped", {}))
        meta["sets"].update(m.get("sets", {}))
        meta["wall_seconds"] = round(meta["wall_seconds"] + m.get("wall_seconds", 0.0), 1)
        meta["chunks"].append({"chunk": os.path.basename(d), "date": m.get("date"),
                               "wall_seconds": m.get("wall_seconds"), "rows": len(c["rows"])})
    base = {b: {(r["case"], r["method"]): r["median_ms"] for r in rows if r["provider"] == b} for b in BASELINES}
    for r in rows:
        key = (r["case"], r["method"])
        for b, field in (("reference", "speedup"), ("compile", "speedup_vs_compile"),
                         ("foreach", "speedup_vs_foreach")):
            t = base[b].get(key)
            r[field] = None if t is None or not r["median_ms"] else t / r["median_ms"]
    return {"meta": meta, "rows": rows}


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def headline(results: dict) -> str:
    """Markdown: per case and method, the baselines' times and the fastest fused provider's time,
    GB/s, % of copy bandwidth, speed-ups and host syncs per step."""
    rows = results["rows"]
    keys = list(dict.fromkeys((r["case"], r["method"]) for r in rows))
    out = ["| set/dtype | method | reference ms | compile ms | foreach ms | best fused | ms | GB/s | % copy "
           "| x reference | x compile | x foreach | syncs/step |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case, method in keys:
        mine = [r for r in rows if (r["case"], r["method"]) == (case, method)]
        ms = {r["provider"]: r["median_ms"] for r in mine}
        fused = [r for r in mine if r["provider"] not in BASELINES]
        if not fused:
            continue
        best = min(fused, key=lambda r: r["median_ms"])
        out.append(f"| {case} | {method} | {_fmt(ms.get('reference'), '.3f')} | {_fmt(ms.get('compile'), '.3f')} "
                   f"| {_fmt(ms.get('foreach'), '.3f')} | {best['provider']} | {best['median_ms']:.3f} "
                   f"| {best['gbps']:.1f} | {best['pct_copy']:.0f} | {_fmt(best.get('speedup'), '.2f')} "
                   f"| {_fmt(best.get('speedup_vs_compile'), '.2f')} | {_fmt(best.get('speedup_vs_foreach'), '.2f')} "
                   f"| {_fmt(best.get('host_syncs'), 'd')} |")
    return "\n".join(out)


def run_chunk(bench_args: list[str]) -> int:
    """``fused-adv bench BENCH_ARGS`` with the providers this registry lacks dropped."""
    import argparse

    from fused_adv import bench
    from fused_adv._bench.providers import PROVIDERS

    p = argparse.ArgumentParser(prog="gpu_bench chunk")
    bench.add_arguments(p)
    args = p.parse_args(bench_args)
    if args.providers:
        want = [x.strip() for x in args.providers.split(",") if x.strip()]
        missing = [x for x in want if x not in PROVIDERS]
        if missing:
            print(f"gpu_bench: providers not in this registry, dropped: {', '.join(missing)}")
        args.providers = ",".join(x for x in want if x in PROVIDERS)
        if not args.providers:
            print("gpu_bench: no provider left for this chunk")
            return 0
    return bench.main_args(args)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--merged", required=True, help="folder for the merged results")
    p.add_argument("--chunks", nargs="+", required=True, help="chunk folders to merge (this one included)")
    args = p.parse_args(argv)
    rc = 0
    if bench_args:
        try:
            rc = run_chunk(bench_args)
        except Exception:  # the chunks before this one are still merged and written
            import traceback
            traceback.print_exc()
            rc = 1
    from fused_adv import bench

    try:
        results = merge(args.chunks)
    except SystemExit as exc:
        print(exc)
        return rc or 1
    paths = bench.write_results(results, args.merged, plot=True)
    table = headline(results)
    with open(os.path.join(args.merged, "results.md"), "a") as f:
        f.write("\n## Headline: fastest fused provider per case\n\n" + table + "\n")
    print(table)
    print("wrote " + ", ".join(paths))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
