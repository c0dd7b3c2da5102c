"""fused_adv.reference: the community classes, literal and slow — the oracle every backend is
tested against (docs/methods.md).  Not for production: use fused_adv.FGM / PGD / AWP ...

These classes share no code with the fused drop-ins except the helpers of fused_adv._shared
(pinned on their own by tests/test_shared_helpers.py)."""
from fused_adv.reference.awp import AWP
from fused_adv.reference.awp_paper import AdvWeightPerturb
from fused_adv.reference.fgm import FGM, FGSM
from fused_adv.reference.freeat import FreeAT
from fused_adv.reference.freelb import FreeLB
from fused_adv.reference.mifgsm import MIFGSM
from fused_adv.reference.pgd import PGD
from fused_adv.reference.sam import SAM
from fused_adv.reference.sift import AdversarialLearner, PerturbationLayer, hook_sift_layer, symmetric_kl
from fused_adv.reference.smart import SMART, stable_kl, sym_kl_batchmean
from fused_adv.reference.yopo import YOPO

__all__ = ["FGM", "FGSM", "MIFGSM", "PGD", "AWP", "AdvWeightPerturb", "FreeLB", "SMART", "FreeAT", "YOPO", "SAM",
           "stable_kl",
           "sym_kl_batchmean",
           "hook_sift_layer", "AdversarialLearner", "PerturbationLayer", "symmetric_kl"]
