"""``python -m fused_adv.demo``: the same as ``fused-adv demo``."""
import sys

from fused_adv.demo import main

sys.exit(main())
