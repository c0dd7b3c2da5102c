"""The registry of the HF integration's methods: ``adversarial=<name>`` -> its ``Strategy`` class.
Adding a method is one file in this folder and one entry below (docs/hf.md, "Adding a method")."""
from __future__ import annotations

from .awp import AWPStrategy
from .awp_paper import AWPPaperStrategy
from .base import Strategy
from .freelb import FreeLBStrategy
from .mifgsm import MIFGSMStrategy
from .sam import ASAMStrategy, SAMStrategy
from .sift import SiFTStrategy
from .smart import SMARTStrategy
from .weight import FGMStrategy, FGSMStrategy, PGDStrategy
from .yopo import YOPOStrategy

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    FGMStrategy, FGSMStrategy, PGDStrategy, AWPStrategy, FreeLBStrategy, SMARTStrategy, SiFTStrategy,
    MIFGSMStrategy, AWPPaperStrategy,
    SAMStrategy, ASAMStrategy,
    YOPOStrategy,
)}

__all__ = ["STRATEGIES", "Strategy"]
