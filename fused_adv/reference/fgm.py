"""Community FGM and FGSM classes, step for step (SPEC.md §1-2): the oracle for the fused ones.

Deliberately slow and literal: one Python loop over ``named_parameters()``, a host sync per
tensor (``if norm != 0 and not torch.isnan(norm)``), a clone per backup, and restore by
re-pointing ``param.data`` at the backup.  Keep the community behaviour, defects included
(``emb_name`` matching nothing silently does nothing; a second attack() before restore()
backs up the already perturbed weight).
"""
from __future__ import annotations

import torch


class FGM:
    """Fast Gradient Method on the embedding weight: P <- P + epsilon * G / ||G||."""

    def __init__(self, model, emb_name: str = "word_embeddings", epsilon: float = 1.0):
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
        epsilon = self.epsilon if epsilon is None else epsilon
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                self.backup[name] = param.data.clone()
                if param.grad is not None:  # the community class would crash on a None grad
                    self._step(param, epsilon)

    def restore(self, emb_name: str | None = None) -> None:
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if name not in self.backup:
                    raise RuntimeError(f"restore() without attack(): no backup of {name!r}")
                param.data = self.backup[name]
        self.backup = {}


class FGSM(FGM):
    """Sign variant: P <- P + epsilon * sign(G); no norm, no skip rule."""

    def _step(self, param: torch.Tensor, epsilon: float) -> None:
        param.data.add_(epsilon * torch.sign(param.grad))
