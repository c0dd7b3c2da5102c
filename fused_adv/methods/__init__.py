"""The fused drop-in classes (same constructors, methods and numbers as fused_adv.reference)."""
from fused_adv.methods._common import AttackStateError
from fused_adv.methods.awp import AWP
from fused_adv.methods.fgm import FGM, FGSM
from fused_adv.methods.pgd import PGD

__all__ = ["FGM", "FGSM", "PGD", "AWP", "AttackStateError"]
