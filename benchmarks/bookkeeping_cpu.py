"""CPU bookkeeping speed of FGM / PGD-3 / AWP: community vs foreach rewrite vs fused backends,
interleaved (the code and its flags: fused_adv/_bench/bookkeeping_cpu.py).

    python benchmarks/bookkeeping_cpu.py [--reps 30] [--warmup 3] [--threads N] [--dtype float32]
                                         [--providers community,foreach,torch,cpp,cpp-swap]
"""
import os
import sys

# Run as a plain script from anywhere: import this checkout's fused_adv, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fused_adv._bench.bookkeeping_cpu import main  # noqa: E402

if __name__ == "__main__":
    main()
