"""The fused drop-in classes (same constructors, methods and numbers as fused_adv.reference)."""
from fused_adv.methods._common import AttackStateError, NoGradientError
from fused_adv.methods.awp import AWP
from fused_adv.methods.awp_paper import AdvWeightPerturb
from fused_adv.methods.fgm import FGM, FGSM
from fused_adv.methods.freeat import FreeAT
from fused_adv.methods.freelb import FreeLB
from fused_adv.methods.mifgsm import MIFGSM
from fused_adv.methods.pgd import PGD
from fused_adv.methods.sam import SAM
from fused_adv.methods.smart import SMART
from fused_adv.methods.yopo import YOPO

__all__ = ["FGM", "FGSM", "PGD", "AWP", "FreeLB", "SMART", "MIFGSM", "AdvWeightPerturb", "FreeAT", "YOPO", "SAM",
           "AttackStateError", "NoGradientError"]
