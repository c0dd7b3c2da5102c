"""Hugging Face ``Trainer`` integration: adversarial training with the fused classes in three lines.

::

    from fused_adv.integrations.hf import AdversarialTrainerMixin

    class AWPTrainer(AdversarialTrainerMixin, Trainer):     # or (Mixin, SFTTrainer), ...
        pass

    trainer = AWPTrainer(model=model, args=args, train_dataset=ds,
                         adversarial="awp", adversarial_kwargs={"adv_lr": 1e-3, "adv_eps": 1e-2})

or, for a trainer that already exists (any ``Trainer`` subclass, e.g. TRL's)::

    from fused_adv.integrations.hf import make_adversarial
    make_adversarial(trainer, "fgm", epsilon=0.5)            # swaps in a dynamic subclass

``adversarial`` is ``"fgm" | "fgsm" | "pgd" | "awp"`` (weight space: the input embedding or the
weights are perturbed and restored) or ``"freelb" | "smart" | "sift"`` (activation space: the
embedding OUTPUT is perturbed; no weight is ever touched).  ``adversarial_kwargs`` holds the
method's arguments and the integration options below:

- fgm/fgsm/pgd/awp: the class's constructor arguments (``epsilon``, ``alpha``, ``emb_name``,
  ``adv_lr``, ``adv_eps``, ``adv_param``, ``adv_step``, ``start_epoch``, ...; SPEC.md §1-4);
- freelb: ``fused_adv.FreeLB``'s (``adv_K``, ``adv_lr``, ``adv_init_mag``, ``adv_max_norm``,
  ``adv_norm_type``, ``embedding``; SPEC.md §6);
- smart: ``fused_adv.SMART``'s (``adv_alpha``, ``noise_var``, ``step_size``, ``epsilon``, ``adv_K``,
  ``embedding_module``, ``host_guard``; SPEC.md §7);
- sift: ``hook_sift_layer``'s (``hidden_size`` (default ``config.hidden_size``), ``learning_rate``,
  ``init_perturbation``, ``target_module``, ``bind_each``) plus ``loss_fn`` (the ascent loss,
  'symmetric-kl' | 'kl' | 'mse' | callable) and ``vat_lambda`` (the term's weight, default 1;
  DeBERTa uses 3-5); SPEC.md §5.

What one micro-batch step does (the gradient bookkeeping of the community loops, SPEC.md §10)
--------------------------------------------------------------------------------------------
- fgm / fgsm: clean forward/backward; perturb the input embedding from its gradient; adversarial
  forward/backward (gradients ACCUMULATE: clean + adversarial); restore.
- pgd: clean forward/backward; set the clean grads aside; K attack steps (option ``K``, default 3),
  the intermediate adversarial grads thrown away; the clean grads handed back before the last
  adversarial backward (final grad = clean + last adversarial); restore.
- awp: clean forward/backward; ``adv_step`` weight-perturbation steps, each followed by an
  adversarial forward/backward with the gradients zeroed first (the optimizer step uses ONLY the
  last adversarial gradient, as in the Kaggle class); restore.
- freelb: NO clean pass: K (``adv_K``) forward/backward passes on ``inputs_embeds = embed(input_ids)
  + delta`` (the batch's ``input_ids`` are replaced; the model must accept ``inputs_embeds``),
  each backward on loss / K (gradients ACCUMULATE the mean of the K adversarial gradients), a
  fused ascent step on delta between passes, none after the last.
- smart / sift: one step whose ``compute_loss`` also computes the adversarial term from the clean
  logits (``compute_loss(..., return_outputs=True)`` must give a ModelOutput/dict with ``logits``,
  or the logits tensor): SMART's ``adv_alpha * SymKL`` (its ascent forwards use autograd.grad:
  parameter grads untouched), SiFT's ``vat_lambda * symmetric_kl`` (parameters frozen for its
  ascent backward).  The term's extra forwards run on the unwrapped model, and the term is added
  to the loss at the backward, divided by the micro-batches of the step (one backward, one
  all-reduce).  SiFT hooks a PerturbationLayer on ``target_module`` (``embeddings.LayerNorm``)
  when the attacker is built: from then on that module's input is normalised in every forward,
  evaluation included (DeBERTa's behaviour; LayerNorm of a normalised input changes nothing
  beyond rounding); ``configure_adversarial`` removes the hooks.

Loss scaling, mixed precision, parallelism
------------------------------------------
Every pass is a call of the installed Trainer's own ``training_step``: the clean pass goes through
``super().training_step`` (so subclasses such as TRL's run their step logic once per micro-batch),
each adversarial pass through ``transformers.Trainer.training_step`` with the inputs prepared by
the clean pass (``_prepare_inputs`` runs once: a subclass that generates there, like TRL's GRPO,
is not re-run).  Both therefore use ``self.compute_loss`` (with ``num_items_in_batch``), the
multi-GPU ``loss.mean()``, the Trainer's gradient-accumulation division (whichever rule the
installed version applies) and ``self.accelerator.backward`` (GradScaler scaling, autocast).
Set ``adversarial_pass_uses_super = True`` on your class to run the adversarial passes through
``super().training_step`` too (e.g. when your subclass's ``training_step`` wraps the step in a
context the adversarial pass needs).  ``compute_loss`` runs once per pass, so side effects a
subclass has there (TRL's per-batch metrics) happen for the adversarial passes too.

- fp16: both passes are scaled by the same GradScaler scale; the perturbation directions are
  scale-invariant (AWP up to its 1e-6, FreeLB up to its 1e-8 floor), so ``unscale_`` is never
  called here: the Trainer unscales once, before clipping/stepping.  A non-finite clean gradient
  makes the perturbation non-finite (SPEC: an inf norm is not skipped) and so the adversarial
  gradients; the weights are restored bit for bit, the GradScaler sees the inf/NaN and skips the
  optimizer step: the weights are never poisoned.  SMART's and SiFT's ascent gradients are
  taken without the scaler, as in mt-dnn and DeBERTa (normalised, so only fp16 underflow of
  tiny gradients could matter); their NaN/Inf guard keeps the step.
- bf16 / fp16 autocast: whatever the Trainer's arguments say, for both passes (accelerate wraps
  the model's forward).  The fused AWP's own "CUDA autocast around the adversarial forward" is
  not used here.
- DDP: ``clean_pass_no_sync=True`` runs every pass whose gradient only feeds a perturbation
  direction (the clean pass; PGD's and AWP's non-final adversarial passes) under
  ``accelerator.no_sync``: one all-reduce per step instead of two or more.  The direction then
  comes from this rank's own gradient (the default, False, keeps the community loop's
  all-reduced direction).  The kept gradient is correct either way: the final backward of every
  step is synchronised and everything kept is in ``.grad`` by then.  FreeLB keeps every pass's
  gradient, so its non-final passes always run under ``no_sync`` (exact: the final backward
  all-reduces the sum); SMART/SiFT have one DDP forward and one backward per micro-batch.
- DeepSpeed and FSDP (sharded / flattened parameters; accelerate's DeepSpeed backward also steps
  the optimizer) and SageMaker model parallel are refused with a clear error.

Gradient accumulation (option ``perturb_from``)
-----------------------------------------------
With ``gradient_accumulation_steps > 1`` ``.grad`` already holds the earlier micro-batches'
gradients when a micro-batch starts.

- ``"micro_batch"`` (default): the perturbation comes from THIS micro-batch's clean gradient
  (the earlier micro-batches' grads are set aside, no copy, and added back before the final
  backward).  The accumulated gradient is then exactly the sum over micro-batches of what a
  community loop computes on each micro-batch alone (with the Trainer's 1/GA scaling): the
  order of the micro-batches does not matter.  For AWP only this micro-batch's clean gradient
  is discarded (the Kaggle class's ``optimizer.zero_grad()`` would wipe the earlier micro-batches).
- ``"accumulated"``: the perturbation comes from ``.grad`` as it stands after the clean backward
  (earlier micro-batches + this one), what a community loop pasted into a GA loop does for
  FGM/FGSM/PGD.  For AWP, still only this micro-batch's clean gradient is discarded.
With GA = 1 both are identical to the community loop.  (fgm/fgsm/pgd/awp only: FreeLB's delta,
SMART's noise and SiFT's delta always come from this micro-batch alone.)  The SMART/SiFT term of
each micro-batch is divided by the micro-batches of the step, whichever GA convention the
Trainer applies to the task loss (dividing it, or normalising by ``num_items_in_batch``).

Embeddings (fgm / fgsm / pgd)
-----------------------------
Without ``emb_name`` the perturbed weight is ``model.get_input_embeddings().weight`` (found by
identity in ``named_parameters()``: works for BERT, GPT-2, Llama, DeBERTa, PEFT-wrapped models,
DDP-wrapped models).  With ``emb_name`` the community substring rule applies.
- Tied input/output embeddings (GPT-2, MLM heads, many LMs): perturbing the shared matrix also
  perturbs the output projection.  ``tied_embeddings="error"`` (default) refuses with a clear
  error; ``"shared"`` accepts it (what the community classes silently do).
- Frozen embeddings (PEFT/LoRA freezes the base model): the embedding has no gradient, so
  there is no direction (the community classes silently do nothing).  ``frozen_embeddings=
  "error"`` (default) refuses with a clear error; ``"unfreeze"`` computes the embedding's
  gradient during the step only (requires_grad is switched on for the clean pass and back off
  before the final adversarial backward; the embedding is never in the optimizer and its
  ``.grad`` is dropped, so it is never updated).  Or use an activation-space method: FreeLB,
  SMART and SiFT perturb the embedding output and need no embedding gradient, so they work on
  a frozen (PEFT/LoRA) embedding as they are; tied embeddings do not concern them either.

Start (options ``start_step``, ``start_epoch``)
----------------------------------------------
Before ``state.global_step >= start_step`` and ``state.epoch >= start_epoch`` (and for AWP while
``adv_lr == 0``) a step is the plain Trainer step.  AWP's ``start_epoch`` argument is the same
thing (the Kaggle class compares the integer epoch; ``state.epoch`` is a float and reaches k.0
exactly at the start of epoch k, so integer values behave identically).

Logged loss
-----------
``training_step`` returns the CLEAN loss (scaled as the Trainer scales it), so the logged
``loss`` is the same quantity a plain run logs and stays comparable with ``eval_loss`` and with
runs without adversarial training.  The adversarial loss (the last adversarial pass of each
micro-batch, averaged like ``loss``) is logged alongside as ``adv_loss``; for smart/sift
``adv_loss`` is the weighted term added to the loss.  FreeLB has no clean pass (running one would
cost a forward): its ``loss`` is the mean of the K adversarial losses (what FreeLB optimises and
its community loop logs), and there is no ``adv_loss``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import fused_adv
from fused_adv.methods._common import embedding_like_parameters

__all__ = ["AdversarialTrainerMixin", "AdversarialConfig", "make_adversarial", "METHODS"]

METHODS = ("fgm", "fgsm", "pgd", "awp", "freelb", "smart", "sift")
_EMBEDDING_METHODS = ("fgm", "fgsm", "pgd")          # perturb the input-embedding WEIGHT
_WEIGHT_METHODS = _EMBEDDING_METHODS + ("awp",)       # perturb weights: backup/restore, grad bookkeeping

# Keys of adversarial_kwargs that configure the integration (and which methods they apply to);
# every other key goes to the method (checked against its signature when the trainer is configured).
_OPTIONS = {
    "backend": METHODS, "start_step": METHODS, "start_epoch": METHODS,
    "perturb_from": _WEIGHT_METHODS, "clean_pass_no_sync": _WEIGHT_METHODS,
    "tied_embeddings": _EMBEDDING_METHODS, "frozen_embeddings": _EMBEDDING_METHODS,
    "K": ("pgd",),
}
# SiFT has no class of its own: hook_sift_layer's arguments + these two configure it.
_SIFT_EXTRA = ("loss_fn", "vat_lambda")
_UNSET = object()


def _method_class(method: str):
    return {"fgm": fused_adv.FGM, "fgsm": fused_adv.FGSM, "pgd": fused_adv.PGD, "awp": fused_adv.AWP,
            "freelb": fused_adv.FreeLB, "smart": fused_adv.SMART}[method]


def _method_arguments(method: str) -> set[str]:
    """The method arguments adversarial_kwargs may hold (the integration supplies the others)."""
    if method == "sift":
        params = set(inspect.signature(fused_adv.hook_sift_layer).parameters) | set(_SIFT_EXTRA)
        return params - {"model", "backend"}
    taken = {"self", "model", "backend"} | ({"optimizer"} if method == "awp" else set())
    return set(inspect.signature(_method_class(method).__init__).parameters) - taken


@dataclass(frozen=True)
class AdversarialConfig:
    """The validated configuration of an adversarial trainer (see the module docstring)."""

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
        kwargs = dict(kwargs or {})
        if method is None:
            if kwargs:
                raise ValueError("adversarial_kwargs given but adversarial=None")
            return cls()
        m = str(method).lower()
        if m not in METHODS:
            raise ValueError(f"adversarial={method!r}: expected one of {', '.join(METHODS)}")
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS}
        for k in opts:
            if m not in _OPTIONS[k]:
                raise TypeError(f"{k!r} is a {'/'.join(x.upper() for x in _OPTIONS[k])} option, not one of {m}'s")
        if m == "awp" and "start_epoch" in opts:
            kwargs["start_epoch"] = opts["start_epoch"]          # AWP's own argument, same meaning
        elif m == "awp" and "start_epoch" in kwargs:
            opts["start_epoch"] = kwargs["start_epoch"]
        for k in ("emb_name", "embedding", "embedding_module", "hidden_size"):
            if k in kwargs and kwargs[k] is None:
                del kwargs[k]                                    # None = found on the model
        allowed_args = _method_arguments(m)
        unknown = sorted(set(kwargs) - allowed_args)
        if unknown:
            allowed = sorted(allowed_args | {k for k, ms in _OPTIONS.items() if m in ms})
            raise TypeError(f"adversarial_kwargs for {m!r}: unknown {unknown}; allowed: {allowed}")
        cfg = cls(method=m, method_kwargs=kwargs, **opts)
        if cfg.perturb_from not in ("micro_batch", "accumulated"):
            raise ValueError(f"perturb_from={cfg.perturb_from!r}: expected 'micro_batch' or 'accumulated'")
        if cfg.tied_embeddings not in ("error", "shared"):
            raise ValueError(f"tied_embeddings={cfg.tied_embeddings!r}: expected 'error' or 'shared'")
        if cfg.frozen_embeddings not in ("error", "unfreeze"):
            raise ValueError(f"frozen_embeddings={cfg.frozen_embeddings!r}: expected 'error' or 'unfreeze'")
        if int(cfg.K) < 1:
            raise ValueError(f"K must be >= 1, got {cfg.K}")
        steps_arg = {"awp": "adv_step", "freelb": "adv_K", "smart": "adv_K"}.get(m)
        if steps_arg and int(kwargs.get(steps_arg, 1)) < 1:
            raise ValueError(f"{steps_arg} must be >= 1, got {kwargs[steps_arg]}")
        if m == "sift":
            loss_fn = kwargs.get("loss_fn", "symmetric-kl")
            if not callable(loss_fn) and loss_fn not in fused_adv.sift.perturbation_loss_fns:
                raise ValueError(f"loss_fn={loss_fn!r}: expected one of "
                                 f"{', '.join(fused_adv.sift.perturbation_loss_fns)} or a callable")
        return cfg


class _State:
    """Per-trainer runtime state: the attacker (built lazily at the first adversarial step, when
    the wrapped model and the optimizer exist) and the adversarial-loss accumulators."""

    def __init__(self):
        self.model = None              # the (wrapped) model the attacker was built on
        self.attacker = None
        self.targets: list[nn.Parameter] = []    # fgm/fgsm/pgd: the perturbed embedding weight(s)
        self.frozen: list[nn.Parameter] = []     # targets to unfreeze for the step (frozen_embeddings="unfreeze")
        self.awp_ids: set[int] = set()           # awp: ids of the parameters adv_param may select
        self.sift_hooked: list[nn.Module] = []   # sift: the modules carrying the PerturbationLayer hook
        self.loss_sum = None           # sum of finite adversarial losses (tensor, no host sync)
        self.loss_finite = None        # how many of them were finite
        self.loss_count = 0            # how many were recorded
        self.last_logged_step = 0

    def release(self) -> None:
        """Undo what building the attacker did to the model (SiFT's forward pre-hooks)."""
        for module in self.sift_hooked:
            _remove_sift_hooks(module)
        self.sift_hooked = []
        self.model = self.attacker = None


# --------------------------------------------------------------------------------------------
# small helpers


@contextlib.contextmanager
def _instance_override(obj, name: str, value):
    """Shadow a method by an instance attribute for the duration of the block (then un-shadow,
    also restoring an instance attribute that was already there)."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    obj.__dict__[name] = value
    try:
        yield
    finally:
        if had:
            obj.__dict__[name] = old
        else:
            obj.__dict__.pop(name, None)


def _shallow_copy(x):
    # compute_loss may pop keys (labels with a label smoother / compute_loss_func): every pass
    # gets its own container around the same tensors.
    return copy.copy(x) if isinstance(x, (Mapping, list)) else x


def _set_aside(params) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Move the existing ``.grad`` of ``params`` aside (no copy); ``.grad`` becomes None."""
    stash = []
    for p in params:
        if p.grad is not None:
            stash.append((p, p.grad))
            p.grad = None
    return stash


def _hand_back(stash) -> None:
    """Add set-aside grads back: ``.grad = aside + .grad`` (the aside tensor keeps its identity,
    which DDP's bucket views like)."""
    for p, g in stash:
        if p.grad is not None:
            g.add_(p.grad)
        p.grad = g
    stash.clear()


def _set_trainable(params, flag: bool) -> None:
    for p in params:
        if not flag:
            p.grad = None
        p.requires_grad_(flag)


@functools.lru_cache(maxsize=None)
def _trainer_step_takes_num_items() -> bool:
    from transformers import Trainer

    return "num_items_in_batch" in inspect.signature(Trainer.training_step).parameters


def _hf_training_step(cls):
    """``transformers.Trainer.training_step`` if ``cls`` derives from it, else None."""
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover
        return None
    return Trainer.training_step if issubclass(cls, Trainer) else None


def _unwrap(trainer, model):
    acc = getattr(trainer, "accelerator", None)
    if acc is not None and hasattr(acc, "unwrap_model"):
        return acc.unwrap_model(model)
    return getattr(model, "module", model)


def _remove_sift_hooks(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "adv_hook":
            del module._forward_pre_hooks[key]


def _embedding_module(model: nn.Module) -> nn.Module:
    """SMART's perturbed module (the embedding block, whose output is after LayerNorm/dropout):
    ``base_model.embeddings``, looking through a PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(inner, "base_model", inner)
    emb = getattr(base, "embeddings", None)
    if not isinstance(emb, nn.Module):
        raise ValueError(f"SMART: {type(inner).__name__} has no base_model.embeddings module; pass "
                         f"adversarial_kwargs={{'embedding_module': <the module whose output to perturb>}}")
    return emb


def _logits_of(outputs) -> torch.Tensor:
    """The logits in what compute_loss(return_outputs=True) gives back next to the loss."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:   # ModelOutput, dict
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"SMART/SiFT need the clean logits: compute_loss(..., return_outputs=True) returned "
                    f"outputs of type {type(outputs).__name__} without 'logits'. Return the model output "
                    f"(a ModelOutput/dict with 'logits') or the logits tensor.")


def _accumulation_steps(trainer) -> int:
    """How many micro-batches make this optimizer step (the last one of an epoch may have fewer)."""
    return int(getattr(trainer, "current_gradient_accumulation_steps", None)
               or trainer.args.gradient_accumulation_steps)


# --------------------------------------------------------------------------------------------


class AdversarialTrainerMixin:
    """Mixin for ``transformers.Trainer`` (and subclasses such as TRL's trainers) that adds FGM,
    FGSM, PGD, AWP, FreeLB, SMART or SiFT to every training step, with the fused classes.  Put it
    FIRST in the bases::

        class MyTrainer(AdversarialTrainerMixin, Trainer): ...
        MyTrainer(..., adversarial="pgd", adversarial_kwargs={"epsilon": 1.0, "alpha": 0.3, "K": 3})

    Constructor keywords (everything else goes to the Trainer): ``adversarial`` (``None`` = plain
    Trainer), ``adversarial_kwargs`` (method arguments + integration options ``backend``,
    ``start_step``, ``start_epoch``; fgm/fgsm/pgd/awp: ``perturb_from``, ``clean_pass_no_sync``;
    fgm/fgsm/pgd: ``tied_embeddings``, ``frozen_embeddings``; pgd: ``K``), ``adversarial_backend``
    ("auto" | "cuda" | "triton" | "cpp" | "torch").  The same names work as class attributes.  ``configure_adversarial(...)``
    changes them later.  Semantics: module docstring.
    """

    adversarial: str | None = None
    adversarial_kwargs: dict | None = None
    adversarial_backend: str | None = None
    adversarial_pass_uses_super: bool = False

    def __init__(self, *args, adversarial=_UNSET, adversarial_kwargs=_UNSET, adversarial_backend=_UNSET,
                 **kwargs):
        method = type(self).adversarial if adversarial is _UNSET else adversarial
        akw = dict((type(self).adversarial_kwargs if adversarial_kwargs is _UNSET else adversarial_kwargs) or {})
        backend = type(self).adversarial_backend if adversarial_backend is _UNSET else adversarial_backend
        if backend is not None:
            akw["backend"] = backend
        cfg = AdversarialConfig.build(method, akw)  # fail before the (expensive) Trainer init
        super().__init__(*args, **kwargs)
        self._adv_apply(cfg)

    # -- configuration -----------------------------------------------------------------------
    def configure_adversarial(self, adversarial: str | None, **adversarial_kwargs) -> "AdversarialTrainerMixin":
        """(Re)configure: ``trainer.configure_adversarial("awp", adv_lr=1e-3, perturb_from=...)``.
        ``None`` turns adversarial training off.  The attacker is rebuilt at the next step."""
        self._adv_apply(AdversarialConfig.build(adversarial, adversarial_kwargs))
        return self

    def _adv_apply(self, cfg: AdversarialConfig) -> None:
        old = self.__dict__.get("_adv_state")
        if old is not None:
            old.release()
        self._adv_cfg = cfg
        self._adv_state = _State()
        self.adversarial = cfg.method
        self.adversarial_kwargs = dict(cfg.method_kwargs)
        self.adversarial_backend = cfg.backend

    def _adv_config(self) -> AdversarialConfig:
        cfg = self.__dict__.get("_adv_cfg")
        if cfg is None:  # e.g. __init__ bypassed: build from the class attributes
            akw = dict(type(self).adversarial_kwargs or {})
            if type(self).adversarial_backend is not None:
                akw["backend"] = type(self).adversarial_backend
            self._adv_apply(AdversarialConfig.build(type(self).adversarial, akw))
            cfg = self._adv_cfg
        return cfg

    @property
    def adversary(self):
        """The fused attacker (``fused_adv.FGM`` / ``PGD`` / ``AWP`` / ``FreeLB`` / ``SMART``, or SiFT's
        ``AdversarialLearner``), once built (else None)."""
        st = self.__dict__.get("_adv_state")
        return None if st is None else st.attacker

    def _adversarial_active(self, cfg: AdversarialConfig) -> bool:
        state = self.state
        if (state.global_step or 0) < cfg.start_step:
            return False
        if (state.epoch or 0.0) < cfg.start_epoch:
            return False
        if cfg.method == "awp" and cfg.method_kwargs.get("adv_lr", 1.0) == 0:
            return False
        return True

    # -- building the attacker ---------------------------------------------------------------
    def _adv_check_supported(self) -> None:
        reasons = []
        if getattr(self, "is_deepspeed_enabled", False):
            reasons.append("DeepSpeed (ZeRO partitions the weights, and accelerate's DeepSpeed backward also "
                           "steps the optimizer, which would happen between the clean and adversarial passes)")
        if getattr(self, "is_fsdp_enabled", False):
            reasons.append("FSDP (sharded/flattened parameters: the embedding and weights are not whole tensors)")
        try:
            from transformers.utils import is_sagemaker_mp_enabled
            if is_sagemaker_mp_enabled():
                reasons.append("SageMaker model parallel (its training step bypasses compute_loss/backward)")
        except ImportError:  # pragma: no cover
            pass
        if reasons:
            raise NotImplementedError("fused_adv AdversarialTrainerMixin does not support " + "; ".join(reasons))

    def _adv_build(self, model: nn.Module, cfg: AdversarialConfig) -> _State:
        st = self._adv_state
        if st.attacker is not None and st.model is model:
            return st
        self._adv_check_supported()
        st.release()
        kwargs = dict(cfg.method_kwargs)
        st.targets, st.frozen, st.awp_ids = [], [], set()
        unwrapped = _unwrap(self, model)
        if cfg.method == "freelb":
            st.attacker = fused_adv.FreeLB(backend=cfg.backend, **kwargs)
            if st.attacker.embedding is None:
                st.attacker.embedding = unwrapped.get_input_embeddings()
        elif cfg.method == "smart":
            kwargs.setdefault("embedding_module", _embedding_module(unwrapped))
            st.attacker = fused_adv.SMART(backend=cfg.backend, **kwargs)
        elif cfg.method == "sift":
            st.attacker = self._adv_build_sift(unwrapped, kwargs, cfg, st)
        elif cfg.method in _EMBEDDING_METHODS:
            emb_name, st.targets, st.frozen = self._adv_resolve_embedding(model, kwargs.pop("emb_name", None), cfg)
            st.attacker = _method_class(cfg.method)(model, emb_name=emb_name, backend=cfg.backend, **kwargs)
        else:
            optimizer = getattr(self, "optimizer", None)
            # AcceleratedOptimizer.zero_grad() is a no-op on non-sync micro-batches; we never let the
            # class zero grads anyway (we use attack_step/restore), but hand it the real optimizer.
            optimizer = getattr(optimizer, "optimizer", optimizer)
            st.attacker = fused_adv.AWP(model, optimizer, backend=cfg.backend, **kwargs)
            adv_param = st.attacker.adv_param
            st.awp_ids = {id(p) for n, p in model.named_parameters() if p.requires_grad and adv_param in n}
        st.model = model
        return st

    @staticmethod
    def _adv_build_sift(unwrapped: nn.Module, kwargs: dict, cfg: AdversarialConfig, st: _State):
        """Hooks PerturbationLayers on the unwrapped model (DeBERTa's hook_sift_layer: the hooked
        module's input is normalised in every forward from now on, evaluation included, as in
        DeBERTa) and returns the fused AdversarialLearner, with ``loss_fn``/``vat_lambda`` on it."""
        loss_fn = kwargs.pop("loss_fn", "symmetric-kl")
        vat_lambda = float(kwargs.pop("vat_lambda", 1.0))
        if "hidden_size" not in kwargs:
            hidden = getattr(getattr(unwrapped, "config", None), "hidden_size", None)
            if hidden is None:
                raise ValueError("SiFT: the model has no config.hidden_size; pass adversarial_kwargs="
                                 "{'hidden_size': <last dim of target_module's input>}")
            kwargs["hidden_size"] = hidden
        target = kwargs.get("target_module", "embeddings.LayerNorm")
        hooked = ([m for n, m in unwrapped.named_modules() if target in n] if isinstance(target, str)
                  else [target])
        adv_modules = fused_adv.hook_sift_layer(unwrapped, backend=cfg.backend, **kwargs)
        st.sift_hooked = hooked
        learner = fused_adv.sift.AdversarialLearner(unwrapped, adv_modules)
        learner.loss_fn, learner.vat_lambda = loss_fn, vat_lambda
        return learner

    def _adv_resolve_embedding(self, model: nn.Module, emb_name: str | None, cfg: AdversarialConfig):
        """-> (emb_name for the fused class, target params, frozen targets to unfreeze per step)."""
        named = list(model.named_parameters())
        if emb_name is None:
            unwrapped = _unwrap(self, model)
            try:
                emb = unwrapped.get_input_embeddings()
            except (AttributeError, NotImplementedError):
                emb = None
            weight = getattr(emb, "weight", None)
            name = next((n for n, p in named if p is weight), None) if isinstance(weight, torch.Tensor) else None
            if name is None:
                raise ValueError(
                    f"{type(unwrapped).__name__}.get_input_embeddings() gives no weight among the model's "
                    f"parameters; pass adversarial_kwargs={{'emb_name': ...}} (a substring of the embedding's "
                    f"name). Embedding-like parameters: {', '.join(embedding_like_parameters(model)[:12]) or '(none)'}")
            clashes = [n for n, _ in named if name in n and n != name]
            if clashes:
                raise ValueError(f"the input embedding's name {name!r} is also a substring of {clashes}: the "
                                 "fused classes select by substring; pass an unambiguous emb_name")
            emb_name = name
        matched = [(n, p) for n, p in named if emb_name in n]
        if not matched:
            raise ValueError(
                f"emb_name={emb_name!r} matches no parameter of {type(model).__name__}, so the attack would "
                f"silently do nothing. Embedding-like parameters: "
                f"{', '.join(embedding_like_parameters(model)[:12]) or '(none)'}")
        targets = [p for _, p in matched if p.requires_grad]
        frozen = []
        if not targets:
            if cfg.frozen_embeddings != "unfreeze":
                raise ValueError(
                    f"The embedding weight(s) {[n for n, _ in matched]} are frozen (requires_grad=False), as in "
                    f"PEFT/LoRA models: they get no gradient, so {cfg.method.upper()} has no direction (the "
                    f"community classes silently do nothing). Either make the embedding trainable (PEFT: "
                    f"modules_to_save=['embed_tokens'/'word_embeddings']), pass adversarial_kwargs="
                    f"{{'frozen_embeddings': 'unfreeze'}} to compute its gradient during the step only (it is "
                    f"never updated), use an activation-space method (adversarial='freelb' | 'smart' | 'sift': "
                    f"they perturb the embedding OUTPUT and need no embedding gradient), or adversarial='awp' "
                    f"on the trainable (adapter) weights.")
            targets = frozen = [p for _, p in matched]
        # Tied weights: the same tensor reachable under another name, or another parameter sharing storage.
        all_named = list(model.named_parameters(remove_duplicate=False))
        for t in targets:
            own = [n for n, p in matched if p is t]
            # the same Parameter under another name, or another Parameter viewing the same memory
            tied = [n for n, p in all_named
                    if (p is t and n not in own)
                    or (p is not t and p.shape == t.shape and p.device == t.device and p.device.type != "meta"
                        and p.data_ptr() == t.data_ptr())]
            if tied and cfg.tied_embeddings != "shared":
                raise ValueError(
                    f"The embedding weight {own} is tied to {tied} (tie_word_embeddings): {cfg.method.upper()} "
                    f"would perturb that output projection too, which the community classes do silently. Pass "
                    f"adversarial_kwargs={{'tied_embeddings': 'shared'}} to accept it (community behaviour), or "
                    f"untie the weights (config.tie_word_embeddings=False before loading).")
        return emb_name, targets, frozen

    # -- the passes ----------------------------------------------------------------------------
    def _adv_clean_pass(self, model, inputs, pass_args, kwargs, no_sync: bool):
        """super().training_step (the subclass chain's full step), capturing the prepared inputs."""
        captured = {}
        prepare = self._prepare_inputs

        def capture(inp, *a, **k):
            out = prepare(inp, *a, **k)
            captured["inputs"] = _shallow_copy(out)
            return out

        sync = self.accelerator.no_sync(model) if no_sync else contextlib.nullcontext()
        with _instance_override(self, "_prepare_inputs", capture), sync:
            loss = super().training_step(model, inputs, *pass_args, **kwargs)
        return loss, captured.get("inputs", _UNSET)

    def _adv_adversarial_pass(self, model, inputs, prepared, pass_args, kwargs, no_sync: bool,
                              use_super: bool = False):
        """One adversarial forward/backward through the Trainer's own training_step (or through
        ``super().training_step``, the subclass chain's, with ``use_super``)."""
        step = None if (use_super or self.adversarial_pass_uses_super) else _hf_training_step(type(self))
        if step is None:
            step = super().training_step
        else:
            step = functools.partial(step, self)
        override = contextlib.nullcontext()
        if prepared is not _UNSET:
            override = _instance_override(self, "_prepare_inputs", lambda inp, *a, **k: _shallow_copy(prepared))
        sync = self.accelerator.no_sync(model) if no_sync else contextlib.nullcontext()
        with override, sync:
            return step(model, inputs, *pass_args, **kwargs)

    # -- training_step ---------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None, *args, **kwargs) -> torch.Tensor:
        """The Trainer's step plus the configured adversarial pass(es); returns the clean loss."""
        pass_args = ((num_items_in_batch,) if (num_items_in_batch is not None or _trainer_step_takes_num_items())
                     else ()) + tuple(args)
        cfg = self._adv_config()
        if cfg.method is None or not self._adversarial_active(cfg):
            return super().training_step(model, inputs, *pass_args, **kwargs)
        st = self._adv_build(model, cfg)
        run = {"fgm": self._adv_step_fgm, "fgsm": self._adv_step_fgm, "pgd": self._adv_step_pgd,
               "awp": self._adv_step_awp, "freelb": self._adv_step_freelb, "smart": self._adv_step_regularizer,
               "sift": self._adv_step_regularizer}[cfg.method]
        loss, adv_loss = run(model, inputs, pass_args, kwargs, cfg, st)
        self._adv_record(adv_loss)
        return loss

    def _adv_step_fgm(self, model, inputs, pass_args, kwargs, cfg, st):
        fgm = st.attacker
        stash = _set_aside(st.targets) if cfg.perturb_from == "micro_batch" else []
        _set_trainable(st.frozen, True)
        try:
            loss, prepared = self._adv_clean_pass(model, inputs, pass_args, kwargs, cfg.clean_pass_no_sync)
            fgm.attack()
            _set_trainable(st.frozen, False)     # direction taken: no embedding grad in the adversarial pass
            _hand_back(stash)                    # before the final (synchronised) backward
            adv_loss = self._adv_adversarial_pass(model, inputs, prepared, pass_args, kwargs, False)
        finally:
            if fgm.is_attacked:
                fgm.restore()
            _hand_back(stash)
            _set_trainable(st.frozen, False)
        return loss, adv_loss

    def _adv_step_pgd(self, model, inputs, pass_args, kwargs, cfg, st):
        pgd, K = st.attacker, int(cfg.K)
        stash = _set_aside(st.targets) if cfg.perturb_from == "micro_batch" else []
        _set_trainable(st.frozen, True)
        try:
            loss, prepared = self._adv_clean_pass(model, inputs, pass_args, kwargs, cfg.clean_pass_no_sync)
            pgd.backup_grad()
            for t in range(K):
                pgd.attack(is_first_attack=(t == 0))
                last = t == K - 1
                if not last:
                    model.zero_grad(set_to_none=True)   # intermediate adversarial grads are thrown away
                else:
                    pgd.restore_grad()                  # clean grads back; the last adversarial grad adds on
                    _hand_back(stash)
                    _set_trainable(st.frozen, False)
                adv_loss = self._adv_adversarial_pass(model, inputs, prepared, pass_args, kwargs,
                                                      cfg.clean_pass_no_sync and not last)
        finally:
            if pgd.is_attacked:
                pgd.restore()
            if getattr(pgd, "_grads_aside", None):
                pgd.restore_grad()
            _hand_back(stash)
            _set_trainable(st.frozen, False)
        return loss, adv_loss

    def _adv_step_awp(self, model, inputs, pass_args, kwargs, cfg, st):
        awp = st.attacker
        if (self.state.epoch or 0.0) < awp.start_epoch:
            return super().training_step(model, inputs, *pass_args, **kwargs), None
        # Everything accumulated so far is set aside: only THIS micro-batch's clean grad is discarded.
        stash = _set_aside(p for p in model.parameters() if p.grad is not None)
        try:
            loss, prepared = self._adv_clean_pass(model, inputs, pass_args, kwargs, cfg.clean_pass_no_sync)
            if cfg.perturb_from == "accumulated":
                for p, g in stash:              # direction from (earlier micro-batches + this one)
                    if id(p) in st.awp_ids:
                        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            for i in range(awp.adv_step):
                awp.attack_step(first=(i == 0))
                model.zero_grad(set_to_none=True)       # the clean (or previous adversarial) grad is discarded
                last = i == awp.adv_step - 1
                if last:
                    _hand_back(stash)                   # earlier micro-batches' grads, before the final backward
                adv_loss = self._adv_adversarial_pass(model, inputs, prepared, pass_args, kwargs,
                                                      cfg.clean_pass_no_sync and not last)
        finally:
            if awp.is_attacked:
                awp.restore()
            _hand_back(stash)
        return loss, adv_loss

    def _adv_step_freelb(self, model, inputs, pass_args, kwargs, cfg, st):
        """FreeLB's K passes on embeddings + delta, each through the Trainer's step with its loss
        divided by K at the backward (accelerator.backward(loss / K)): the parameter grads
        accumulate the mean of the K adversarial gradients.  Returns the mean adversarial loss."""
        freelb = st.attacker
        prepared = self._prepare_inputs(inputs)          # once: every pass reuses it
        if not isinstance(prepared, Mapping) or "input_ids" not in prepared:
            raise ValueError("FreeLB replaces the batch's 'input_ids' by 'inputs_embeds', but this batch has no "
                             f"'input_ids' (keys: {sorted(prepared) if isinstance(prepared, Mapping) else '?'})")
        base = dict(prepared)
        input_ids = base.pop("input_ids")
        mask = base.get("attention_mask")
        if mask is None:                                 # no padding: every token counts in the init
            mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        K = int(freelb.adv_K)
        backward = self.accelerator.backward

        def backward_mean_of_K(loss, **kw):
            return backward(loss / K, **kw)

        embeds = freelb.embedding(input_ids)
        delta = freelb.init_delta(embeds, mask).contiguous()
        total = None
        with _instance_override(self.accelerator, "backward", backward_mean_of_K):
            for k in range(K):
                delta.requires_grad_()
                batch = dict(base, inputs_embeds=delta + embeds)
                last = k == K - 1
                # Every pass's parameter grad is KEPT, so the non-final passes can skip DDP's
                # all-reduce exactly: the final (synchronised) backward reduces the accumulated sum.
                loss = self._adv_adversarial_pass(model, inputs, batch, pass_args, kwargs, no_sync=not last,
                                                  use_super=(k == 0))
                total = loss if total is None else total + loss
                if last:
                    break
                grad, delta.grad = delta.grad, None
                if grad is None:
                    raise RuntimeError("FreeLB: delta got no gradient: the model must take 'inputs_embeds' "
                                       "and its loss must depend on them")
                delta = freelb.update_delta(delta.detach(), grad)     # in place, fused
                embeds = freelb.embedding(input_ids)                  # looked up again, as the original
        return total / K, None

    def _adv_step_regularizer(self, model, inputs, pass_args, kwargs, cfg, st):
        """SMART / SiFT: one Trainer step whose compute_loss also computes the adversarial term from
        the clean logits (extra forwards on the unwrapped model: no second DDP forward); the term
        is added at the backward, divided by the micro-batches per step, so the Trainer's own
        loss (returned, logged) stays the clean one and its GA convention does not matter."""
        compute_loss = self.compute_loss
        backward = self.accelerator.backward
        unwrapped = _unwrap(self, model)
        terms, added = [], []

        def compute_loss_with_term(model_, inputs_, return_outputs=False, **kw):
            batch = _shallow_copy(inputs_)               # compute_loss may pop the labels
            out = compute_loss(model_, inputs_, return_outputs=True, **kw)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"{type(self).__name__}.compute_loss(return_outputs=True) must return "
                                f"(loss, outputs); got {type(out).__name__}")
            terms.append(self._adv_regularizer_term(cfg, st, unwrapped, batch, _logits_of(out[1])))
            return out if return_outputs else out[0]

        def backward_with_term(loss, **kw):
            if len(terms) == 1 and not added:
                added.append(True)
                loss = loss + terms[0] / _accumulation_steps(self)
            return backward(loss, **kw)

        with _instance_override(self, "compute_loss", compute_loss_with_term), \
                _instance_override(self.accelerator, "backward", backward_with_term):
            loss = super().training_step(model, inputs, *pass_args, **kwargs)
        if len(terms) != 1 or not added:
            raise RuntimeError(
                f"{cfg.method.upper()} expects one compute_loss call followed by accelerator.backward per "
                f"training step; {type(self).__name__}.training_step made {len(terms)} compute_loss call(s) "
                f"and {'a' if added else 'no'} backward with the term (a subclass with its own loop needs "
                f"its own integration)")
        return loss, torch.as_tensor(terms[0]).detach() / _accumulation_steps(self)

    @staticmethod
    def _adv_regularizer_term(cfg, st, model, batch, logits):
        """The weighted adversarial term of SMART (``adv_alpha * SymKL``) or SiFT
        (``vat_lambda * symmetric_kl``), from the clean logits of this batch."""
        if cfg.method == "smart":
            return st.attacker.loss(model, batch, logits)
        learner = st.attacker

        def logits_fn(m, **kw):
            return _logits_of(m(**kw))
        return learner.loss(logits, logits_fn, learner.loss_fn, **batch) * learner.vat_lambda

    # -- logging ---------------------------------------------------------------------------------
    def _adv_record(self, adv_loss) -> None:
        if adv_loss is None:
            return
        st = self._adv_state
        adv_loss = adv_loss.detach().float().reshape(())
        finite = torch.isfinite(adv_loss)
        value = torch.where(finite, adv_loss, torch.zeros_like(adv_loss))   # no host sync per step
        if st.loss_sum is None:
            st.loss_sum, st.loss_finite = value, finite.float()
        else:
            st.loss_sum = st.loss_sum + value
            st.loss_finite = st.loss_finite + finite.float()
        st.loss_count += 1

    def log(self, logs: dict, *args, **kwargs):
        """Adds ``adv_loss`` next to the Trainer's (clean) ``loss``: the adversarial loss per optimizer
        step since the last log, averaged like ``loss`` (non-finite micro-batch values left out)."""
        st = self.__dict__.get("_adv_state")
        if st is not None and "loss" in logs and st.loss_count:
            steps = max(1, self.state.global_step - st.last_logged_step)
            pair = torch.stack([st.loss_sum, st.loss_finite])
            acc = getattr(self, "accelerator", None)
            if acc is not None and getattr(acc, "num_processes", 1) > 1:
                pair = acc.gather(pair.reshape(1, 2)).sum(0)
            total, finite = pair.tolist()
            # mean of the finite values, counted as many times as values were recorded, per step
            logs["adv_loss"] = total / finite * st.loss_count / steps if finite > 0 else math.nan
            st.loss_sum = st.loss_finite = None
            st.loss_count = 0
            st.last_logged_step = self.state.global_step
        return super().log(logs, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _adversarial_class(base: type) -> type:
    return type(f"Adversarial{base.__name__}", (AdversarialTrainerMixin, base),
                {"__module__": base.__module__, "__doc__": f"{base.__name__} + fused_adv AdversarialTrainerMixin"})


def make_adversarial(trainer, adversarial: str | None = "awp", **adversarial_kwargs):
    """Turn an existing Trainer instance (any ``transformers.Trainer`` subclass) into an adversarial
    one in place: its class is swapped for a dynamic subclass ``(AdversarialTrainerMixin, type(trainer))``
    (cached per class) and configured with ``adversarial`` and ``adversarial_kwargs`` (method
    arguments and integration options, see the module docstring).  Returns the same trainer.

        trainer = SFTTrainer(...)
        make_adversarial(trainer, "awp", adv_lr=1e-3, adv_eps=1e-2, start_epoch=1)
        trainer.train()
    """
    cfg = AdversarialConfig.build(adversarial, adversarial_kwargs)
    if not isinstance(trainer, AdversarialTrainerMixin):
        trainer.__class__ = _adversarial_class(type(trainer))
    trainer._adv_apply(cfg)
    return trainer
