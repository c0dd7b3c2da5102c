"""The passes one micro-batch is made of, each a call of the installed Trainer's own
``training_step`` (docs/hf.md, "Loss scaling, mixed precision, parallelism"), and the small pieces of
Trainer plumbing the strategies share."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Mapping

import torch
from torch import nn

NOT_CAPTURED = object()     # the clean pass never reached _prepare_inputs (a subclass skipped it)


class Passes:
    """One micro-batch: the Trainer, the model and the arguments its ``training_step`` was called
    with, and the ways a strategy runs a pass on them.  ``super_step`` is the subclass chain's
    ``training_step`` after the mixin (``super().training_step`` inside the mixin)."""

    def __init__(self, trainer, super_step, model: nn.Module, inputs, pass_args: tuple, kwargs: dict):
        self.trainer, self.super_step, self.model = trainer, super_step, model
        self.inputs, self.pass_args, self.kwargs = inputs, pass_args, kwargs

    def plain(self) -> torch.Tensor:
        """The plain Trainer step (the subclass chain's), its loss returned."""
        return self.super_step(self.model, self.inputs, *self.pass_args, **self.kwargs)

    def clean(self, no_sync: bool):
        """The plain step, capturing what ``_prepare_inputs`` gave -> (loss, prepared inputs or
        ``NOT_CAPTURED``).  ``no_sync``: under ``accelerator.no_sync`` (no DDP all-reduce)."""
        tr, captured = self.trainer, {}
        prepare = tr._prepare_inputs

        def capture(inp, *a, **k):
            out = prepare(inp, *a, **k)
            captured["inputs"] = shallow_copy(out)
            return out

        with instance_override(tr, "_prepare_inputs", capture), self._sync(no_sync):
            loss = self.plain()
        return loss, captured.get("inputs", NOT_CAPTURED)

    def adversarial(self, prepared, no_sync: bool, use_super: bool = False) -> torch.Tensor:
        """One adversarial forward/backward on ``prepared`` (``_prepare_inputs`` is not re-run)
        through ``transformers.Trainer.training_step``, or through the subclass chain's step with
        ``use_super`` or the trainer's ``adversarial_pass_uses_super``.  Returns its loss."""
        tr = self.trainer
        step = None if (use_super or tr.adversarial_pass_uses_super) else _hf_training_step(type(tr))
        step = self.super_step if step is None else functools.partial(step, tr)
        override = contextlib.nullcontext()
        if prepared is not NOT_CAPTURED:
            override = instance_override(tr, "_prepare_inputs", lambda inp, *a, **k: shallow_copy(prepared))
        with override, self._sync(no_sync):
            return step(self.model, self.inputs, *self.pass_args, **self.kwargs)

    def _sync(self, no_sync: bool):
        return self.trainer.accelerator.no_sync(self.model) if no_sync else contextlib.nullcontext()


@contextlib.contextmanager
def instance_override(obj, name: str, value):
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


def shallow_copy(x):
    # compute_loss may pop keys (labels with a label smoother / compute_loss_func): every pass
    # gets its own container around the same tensors.
    return copy.copy(x) if isinstance(x, (Mapping, list)) else x


@functools.lru_cache(maxsize=None)
def trainer_step_takes_num_items() -> bool:
    from transformers import Trainer

    return "num_items_in_batch" in inspect.signature(Trainer.training_step).parameters


def _hf_training_step(cls):
    """``transformers.Trainer.training_step`` if ``cls`` derives from it, else None."""
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover
        return None
    return Trainer.training_step if issubclass(cls, Trainer) else None


def unwrap(trainer, model: nn.Module) -> nn.Module:
    """The model without its DDP (or other accelerate) wrapper."""
    acc = getattr(trainer, "accelerator", None)
    if acc is not None and hasattr(acc, "unwrap_model"):
        return acc.unwrap_model(model)
    return getattr(model, "module", model)


def accumulation_steps(trainer) -> int:
    """How many micro-batches make this optimizer step (the last one of an epoch may have fewer)."""
    return int(getattr(trainer, "current_gradient_accumulation_steps", None)
               or trainer.args.gradient_accumulation_steps)


def logits_of(outputs) -> torch.Tensor:
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
