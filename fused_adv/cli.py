"""The ``fused-adv`` command (also ``python -m fused_adv``).

    fused-adv demo    fine-tune MiniLM-L6 on Rotten Tomatoes: no adversary vs reference vs fused
                      FGM, AWP, FreeLB (--runs: more); clean + attacked accuracy, time, memory
    fused-adv gan-demo  plain WGAN-GP vs probability-ratio clipping + sample reweighting on digits
    fused-adv bench   the bookkeeping benchmark matrix (methods x parameter sets x providers)
    fused-adv info    what is built and which backend serves which device
"""
from __future__ import annotations

import argparse
import sys


def _info_report() -> str:
    """``fused_adv.info.report()`` when that module exists, else a short built-in summary."""
    try:
        from fused_adv import info
    except ImportError:
        info = None
    if info is not None and hasattr(info, "report"):
        return info.report()
    import torch

    import fused_adv
    from fused_adv.ops import BACKENDS, why_not

    lines = [f"fused_adv {fused_adv.__version__} ({fused_adv.__file__})", f"torch {torch.__version__}"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"{dev}:")
        for b in BACKENDS:
            r = why_not(b, torch.device(dev), "restore_")
            lines.append(f"  {b:7s} {'available' if r is None else r}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from fused_adv import bench, demo

    p = argparse.ArgumentParser(prog="fused-adv", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:7]))
    sub = p.add_subparsers(dest="command", metavar="{demo,gan-demo,bench,info}")
    d = sub.add_parser("demo", help="fine-tune MiniLM-L6 with/without (reference, fused) FGM, AWP, FreeLB, ...",
                       description=demo.__doc__.split("\n\n")[0])
    demo.add_arguments(d)
    from fused_adv.gan import demo as gan_demo
    gd = sub.add_parser("gan-demo", help="digits GAN: plain WGAN-GP vs ratio clipping + reweighting",
                        description=gan_demo.__doc__.split("\n\n")[0])
    gan_demo.add_arguments(gd)
    b = sub.add_parser("bench", help="benchmark the FGM/FGSM/PGD/AWP bookkeeping per provider",
                       description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(b)
    sub.add_parser("info", help="print what is built and available")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "demo":
        from fused_adv import demo
        return demo.main_args(args)
    if args.command == "gan-demo":
        from fused_adv.gan import demo as gan_demo
        return gan_demo.main_args(args)
    if args.command == "bench":
        from fused_adv import bench
        return bench.main_args(args)
    if args.command == "info":
        print(_info_report())
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
