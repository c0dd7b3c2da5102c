"""fused_adv.reference: the community classes, literal and slow — the oracle every backend is
tested against (SPEC.md).  Not for production: use fused_adv.FGM / PGD / AWP ..."""
from fused_adv.reference.awp import AWP
from fused_adv.reference.fgm import FGM, FGSM
from fused_adv.reference.pgd import PGD

__all__ = ["FGM", "FGSM", "PGD", "AWP"]
