"""CPU timings of the fused activation-space ops against the reference code they replace (the
code and its flags: fused_adv/_bench/activation_cpu.py).

    python benchmarks/bench_activation_cpu.py [--shape 8 128 384] [--threads 1] [--backends cpp torch]
"""
import os
import sys

# Run as a plain script from anywhere: import this checkout's fused_adv, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fused_adv._bench.activation_cpu import main  # noqa: E402

if __name__ == "__main__":
    main()
