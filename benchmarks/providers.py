"""The benchmark providers (community reference, torch.compile(reference) on GPU, the fused
classes on the torch / cpp / triton / cuda backends) and what one timed step is per method.
Defined in fused_adv/_bench/providers.py (shared with ``fused-adv bench``); re-exported here."""
from fused_adv._bench.providers import *  # noqa: F401,F403
from fused_adv._bench.providers import PGD_K, PROVIDERS, Case, Provider, available, build_case  # noqa: F401
