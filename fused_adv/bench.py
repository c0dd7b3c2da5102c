"""``fused-adv bench``: the bookkeeping benchmark matrix from the command line.

For every (parameter set, dtype) x method (FGM, FGSM, PGD-3, AWP) x provider (community
reference, torch.compile(reference) on GPU, the torch._foreach_* rewrite, fused torch / cpp /
triton / cuda backends, whichever can run here) it measures the median step time, achieved GB/s
against the minimum bytes of docs/design.md §3 (Op contract), % of the copy bandwidth measured in
the same run, peak extra memory and host syncs per step (fused_adv/_bench: matrix.py runs the
matrix, measure.py measures), prints a table and writes results.json,
results.md and results.png to ``benchmarks/results/<device-slug>/`` (``--out`` to change).

    fused-adv bench                      # CPU: tiny BERT fp32/bf16 + MiniLM-L6 fp32, < 3 min
    fused-adv bench --device cuda        # GPU: BERT-base/large, DeBERTa-v3-large, 128k embeddings
    fused-adv bench --sets bert-large:bf16 --methods awp --providers reference,foreach,cuda
"""
from __future__ import annotations

import argparse
import os

import torch

from fused_adv._bench.matrix import format_results, parse_sets, run, write_results
from fused_adv._bench.measure import METHODS
from fused_adv._bench.providers import PROVIDERS
from fused_adv._bench.shapes import CPU_DEFAULT, SHAPE_SETS, dtype_name

__all__ = ["add_arguments", "main", "main_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``fused-adv bench`` options to ``p``."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--sets", default=None,
                   help="comma list of SET[:DTYPE] (dtype fp32|bf16|fp16; both fp32 and bf16 if omitted). "
                        f"Sets: {', '.join(SHAPE_SETS)}. Default: CPU {', '.join(f'{n}:{dtype_name(d)}' for n, d in CPU_DEFAULT)}; "
                        "GPU every real set")
    p.add_argument("--methods", default=None, help=f"comma list from {', '.join(METHODS)} (default all)")
    p.add_argument("--providers", default=None, help=f"comma list from {', '.join(PROVIDERS)} (default all available)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 10 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=None, help="CPU: stop a case's repetitions after this long (default 4)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>)")
    p.add_argument("--smoke", action="store_true", help="toy parameter set, 2 reps: checks the machinery, not speed")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 gives steadier numbers on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main_args(args: argparse.Namespace) -> int:
    """Runs the matrix for parsed ``args``, prints the table, writes the results (unless
    ``--no-save``); returns the exit code.  Raises SystemExit for an unknown set, dtype, method,
    provider, or ``--device cuda`` without a CUDA device."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = parse_sets(args.sets, device, args.smoke)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for m in methods or []:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    reps = args.reps if args.reps is not None else (2 if args.smoke else None)
    results = run(device, sets, methods, providers, reps=reps, warmup=1 if args.smoke else args.warmup,
                  max_seconds=args.max_seconds, memory=not args.no_memory, progress=not args.quiet)
    meta = results["meta"]
    print(f"\nfused_adv bookkeeping benchmark on {meta['device']} ({meta['date']}, torch {meta['versions']['torch']})")
    if meta["providers_skipped"]:
        print("not run: " + "; ".join(f"{k}: {w}" for k, w in meta["providers_skipped"].items()))
    print(format_results(results))
    for e in meta["errors"]:
        print(f"error: {e['case']} {e['method']} {e['provider']}: {e['error']}")
    if not args.no_save:
        out = args.out or os.path.join("benchmarks", "results", meta["device_slug"])
        paths = write_results(results, out, plot=not args.no_plot)
        print("\nwrote " + ", ".join(paths))
    return 0


def main(argv=None) -> int:
    """``fused-adv bench`` with ``argv`` (default: sys.argv[1:])."""
    p = argparse.ArgumentParser(prog="fused-adv bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
