"""Community FGM and FGSM classes, step for step (docs/methods.md §1 (FGM), §2 (FGSM)): the oracle for the fused ones.

Deliberately slow and literal: one Python loop over ``named_parameters()``, a host sync per
tensor (``if norm != 0 and not torch.isnan(norm)``), a clone per backup, and restore by
re-pointing ``param.data`` at the backup.  Keep the community behaviour, defects included
(``emb_name`` matching nothing silently does nothing; a second attack() before restore()
backs up the already perturbed weight).
"""
from __future__ import annotations

import torch


class FGM:
    """``FGM(model, emb_name='word_embeddings', epsilon=1.0)``: the Fast Gradient Method on the
    embedding weight, P <- P + epsilon * G / ||G||.

    Args:
        model: the nn.Module whose parameters are perturbed.
        emb_name: substring of the names of the parameters to perturb.
        epsilon: step length (in the parameter's own units: the whole tensor moves by epsilon).

    State: ``backup`` (name -> clone of the weight) between ``attack()`` and ``restore()``.
    """

    def __init__(self, model, emb_name: str = "word_embeddings", epsilon: float = 1.0):
        """Stores the arguments (see the class docstring); allocates nothing.  Raises nothing."""
        self.model = model
        self.emb_name = emb_name
        self.epsilon = epsilon
        self.backup: dict[str, torch.Tensor] = {}

    def _step(self, param: torch.Tensor, epsilon: float) -> None:
        norm = torch.norm(param.grad)
        if norm != 0 and not torch.isnan(norm):
            r_at = epsilon * param.grad / norm
            param.data.add_(r_at)

    def attack(self, epsilon: float | None = None, emb_name: str | None = None) -> None:
        """Backs up and perturbs every trainable parameter whose name contains ``emb_name``.

        Each such parameter (any shape and float dtype) is cloned into ``backup``; if it has a
        ``.grad`` it moves in place by :meth:`_step` (FGM: ``epsilon * G/||G||``, skipped when
        ||G|| is 0 or NaN; FGSM: ``epsilon * sign(G)``).  ``epsilon`` / ``emb_name`` override the
        constructor's for this call.  Matching nothing does nothing (community behaviour); a
        second call before ``restore()`` backs up the already perturbed weight.  Raises nothing of
        its own.
        """
        epsilon = self.epsilon if epsilon is None else epsilon
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                self.backup[name] = param.data.clone()
                if param.grad is not None:  # the community class would crash on a None grad
                    self._step(param, epsilon)

    def restore(self, emb_name: str | None = None) -> None:
        """Re-points ``param.data`` of every trainable parameter whose name contains ``emb_name``
        at its backup (no copy: the parameter takes the backup's storage), then empties
        ``backup``.  Raises RuntimeError when such a parameter has no backup (restore without
        attack)."""
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if name not in self.backup:
                    raise RuntimeError(f"restore() without attack(): no backup of {name!r}")
                param.data = self.backup[name]
        self.backup = {}


class FGSM(FGM):
    """``FGSM(model, emb_name='word_embeddings', epsilon=1.0)``: the sign variant,
    P <- P + epsilon * sign(G); no norm, no skip rule.  Same API and state as :class:`FGM`."""

    def _step(self, param: torch.Tensor, epsilon: float) -> None:
        param.data.add_(epsilon * torch.sign(param.grad))
