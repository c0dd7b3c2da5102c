"""DeepSpeed ZeRO-3 bookkeeping on 2 CPU ranks: the community workaround vs fused, with collectives per step
(the code and its flags: fused_adv/_bench/deepspeed_zero3.py).

    python benchmarks/deepspeed_zero3.py [--help]
"""
import os
import sys

# Run as a plain script from anywhere: import this checkout's fused_adv, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fused_adv._bench.deepspeed_zero3 import main  # noqa: E402

if __name__ == "__main__":
    main()
