"""fused_adv: fused, drop-in adversarial training (FGM, FGSM, PGD, AWP, ...) for transformers."""
__version__ = "0.1.0"

from fused_adv import ops  # noqa: F401,E402
