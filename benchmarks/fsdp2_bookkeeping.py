"""FSDP2 bookkeeping on 2 CPU ranks (gloo): community classes vs fused, with collectives and host syncs per step
(the code and its flags: fused_adv/_bench/fsdp2_bookkeeping.py).

    python benchmarks/fsdp2_bookkeeping.py [--help]
"""
import os
import sys

# Run as a plain script from anywhere: import this checkout's fused_adv, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fused_adv._bench.fsdp2_bookkeeping import main  # noqa: E402

if __name__ == "__main__":
    main()
