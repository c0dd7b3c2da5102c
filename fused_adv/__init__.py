"""fused_adv: fused, drop-in adversarial training (FGM, FGSM, MI-FGSM, PGD, AWP, the paper's AWP, SiFT, FreeLB,
SMART, FreeAT, YOPO; SAM / ASAM) for transformers.

    from fused_adv import FGM, PGD, AWP          # drop-in for the community classes
    import fused_adv.reference                   # the community classes themselves (the oracle)
    # the drop-ins never inherit from the oracle; what both use lives in fused_adv._shared
    import fused_adv.ops                         # the multi-tensor ops they are built from

Backends: ``backend="auto"`` (default) | "cuda" | "triton" | "cpp" | "torch", or env
``FUSED_ADV_BACKEND``; ``python -m fused_adv.info`` shows what this install can run.
"""
__version__ = "0.1.0"

from fused_adv import ops  # noqa: E402
from fused_adv import sift  # noqa: E402  (DeBERTa's SiFT API: hook_sift_layer, AdversarialLearner)
from fused_adv.methods import (AWP, FGM, FGSM, MIFGSM, PGD, SMART, YOPO, AdvWeightPerturb,  # noqa: E402
                               AttackStateError, FreeAT, FreeLB, NoGradientError, SAM)
from fused_adv.ops import BackendUnavailableError  # noqa: E402
from fused_adv.sift import AdversarialLearner, hook_sift_layer  # noqa: E402

__all__ = ["FGM", "FGSM", "MIFGSM", "PGD", "AWP", "AdvWeightPerturb", "FreeLB", "SMART", "FreeAT", "YOPO", "SAM",
           "hook_sift_layer",
           "AdversarialLearner", "sift",
           "AttackStateError", "NoGradientError", "BackendUnavailableError", "ops", "__version__"]
