"""What smart and sift share: one Trainer step whose ``compute_loss`` also computes an adversarial
term from the clean logits, added to the loss at the backward (docs/hf.md, "smart / sift")."""
from __future__ import annotations

import torch

from ..passes import accumulation_steps, instance_override, logits_of, shallow_copy, unwrap
from .base import Strategy


class RegularizerStrategy(Strategy):
    """A method that adds ``term(model, batch, logits)`` to the clean loss.  The term's extra
    forwards run on the unwrapped model (no second DDP forward); it is added at the backward,
    divided by the micro-batches of the step, so the Trainer's own loss (returned, logged) stays
    the clean one and the Trainer's GA convention does not matter.  ``adv_loss`` is the term."""

    def term(self, model, batch, logits: torch.Tensor) -> torch.Tensor:
        """The weighted adversarial term of this batch (a scalar tensor with a graph to the weights)."""
        raise NotImplementedError(f"{type(self).__name__}.term")

    def step(self, passes):
        trainer = passes.trainer
        compute_loss = trainer.compute_loss
        backward = trainer.accelerator.backward
        unwrapped = unwrap(trainer, passes.model)
        terms, added = [], []

        def compute_loss_with_term(model_, inputs_, return_outputs=False, **kw):
            batch = shallow_copy(inputs_)               # compute_loss may pop the labels
            out = compute_loss(model_, inputs_, return_outputs=True, **kw)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"{type(trainer).__name__}.compute_loss(return_outputs=True) must return "
                                f"(loss, outputs); got {type(out).__name__}")
            terms.append(self.term(unwrapped, batch, logits_of(out[1])))
            return out if return_outputs else out[0]

        def backward_with_term(loss, **kw):
            if len(terms) == 1 and not added:
                added.append(True)
                loss = loss + terms[0] / accumulation_steps(trainer)
            return backward(loss, **kw)

        with instance_override(trainer, "compute_loss", compute_loss_with_term), \
                instance_override(trainer.accelerator, "backward", backward_with_term):
            loss = passes.plain()
        if len(terms) != 1 or not added:
            raise RuntimeError(
                f"{self.name.upper()} expects one compute_loss call followed by accelerator.backward per "
                f"training step; {type(trainer).__name__}.training_step made {len(terms)} compute_loss call(s) "
                f"and {'a' if added else 'no'} backward with the term (a subclass with its own loop needs "
                f"its own integration)")
        return loss, torch.as_tensor(terms[0]).detach() / accumulation_steps(trainer)
