"""``python -m fused_adv {demo,bench,info}``: the same as the ``fused-adv`` command."""
import sys

from fused_adv.cli import main

sys.exit(main())
