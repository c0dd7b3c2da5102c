"""``adversarial`` + ``adversarial_kwargs`` -> a validated ``AdversarialConfig``: integration options
split from method arguments, each checked against the method's ``Strategy`` (docs/hf.md, "Options")."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .strategies import STRATEGIES

METHODS = tuple(STRATEGIES)
COMMON_OPTIONS = ("backend", "start_step", "start_epoch")
# Options with a fixed set of values (checked for every method: the defaults are valid).
CHOICES = {"perturb_from": ("micro_batch", "accumulated"), "tied_embeddings": ("error", "shared"),
           "frozen_embeddings": ("error", "unfreeze")}
# A None value for these means "found on the model": the key is dropped, whatever the method.
FOUND_ON_MODEL = ("emb_name", "embedding", "embedding_module", "hidden_size")


def option_methods() -> dict[str, tuple[str, ...]]:
    """Every integration option -> the methods that accept it (in registry order)."""
    table: dict[str, list[str]] = {}
    for name, strategy in STRATEGIES.items():
        for opt in COMMON_OPTIONS + strategy.options:
            table.setdefault(opt, []).append(name)
    return {opt: tuple(ms) for opt, ms in table.items()}


@dataclass(frozen=True)
class AdversarialConfig:
    """The validated configuration of an adversarial trainer (docs/hf.md): the method (None = plain
    Trainer), its arguments, and the integration options with their defaults.  Build it with
    ``AdversarialConfig.build``; the fields of options a method does not accept keep their defaults."""

    method: str | None = None
    method_kwargs: dict = field(default_factory=dict)
    backend: str = "auto"
    perturb_from: str = "micro_batch"
    clean_pass_no_sync: bool = False
    start_step: int = 0
    start_epoch: float = 0.0
    tied_embeddings: str = "error"
    frozen_embeddings: str = "error"
    K: int = 3

    @classmethod
    def build(cls, method: str | None, kwargs: Mapping[str, Any] | None = None) -> "AdversarialConfig":
        """Split ``kwargs`` into integration options and method arguments and check both.

        ``method`` is one of ``METHODS`` (any case) or None; ``kwargs`` is not mutated.  Raises
        ValueError for an unknown method, kwargs with ``method=None``, or a bad value; TypeError
        for an option of another method or an argument the method does not take.
        """
        kwargs = dict(kwargs or {})
        if method is None:
            if kwargs:
                raise ValueError("adversarial_kwargs given but adversarial=None")
            return cls()
        m = str(method).lower()
        if m not in STRATEGIES:
            raise ValueError(f"adversarial={method!r}: expected one of {', '.join(METHODS)}")
        strategy = STRATEGIES[m]
        accepted_by = option_methods()
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted_by}
        for k in opts:
            if m not in accepted_by[k]:
                raise TypeError(f"{k!r} is a {'/'.join(x.upper() for x in accepted_by[k])} option, not one of {m}'s")
        for k in strategy.shared_options:
            if k in opts:
                kwargs[k] = opts[k]
        for k in FOUND_ON_MODEL:
            if k in kwargs and kwargs[k] is None:
                del kwargs[k]
        allowed_args = strategy.method_arguments()
        unknown = sorted(set(kwargs) - allowed_args)
        if unknown:
            allowed = sorted(allowed_args | {k for k, ms in accepted_by.items() if m in ms})
            raise TypeError(f"adversarial_kwargs for {m!r}: unknown {unknown}; allowed: {allowed}")
        cfg = cls(method=m, method_kwargs=kwargs, **opts)
        for k, choices in CHOICES.items():
            if getattr(cfg, k) not in choices:
                raise ValueError(f"{k}={getattr(cfg, k)!r}: expected {' or '.join(repr(c) for c in choices)}")
        strategy.validate(cfg)
        return cfg
