"""Community PGD class, step for step (SPEC.md §3): the oracle for the fused one.

Usage (K steps): backward; backup_grad(); for t in range(K): attack(is_first_attack=t == 0);
zero_grad() except at t == K-1 where restore_grad(); adversarial forward/backward.  Then
restore(); optimizer.step().  Final grad = clean + last adversarial.
"""
from __future__ import annotations

import torch


class PGD:
    def __init__(self, model, epsilon: float = 1.0, alpha: float = 0.3, emb_name: str = "word_embeddings"):
        self.model = model
        self.epsilon = epsilon
        self.alpha = alpha
        self.emb_name = emb_name
        self.emb_backup: dict[str, torch.Tensor] = {}
        self.grad_backup: dict[str, torch.Tensor] = {}

    def attack(self, is_first_attack: bool = False, epsilon: float | None = None, alpha: float | None = None,
               emb_name: str | None = None) -> None:
        epsilon = self.epsilon if epsilon is None else epsilon
        alpha = self.alpha if alpha is None else alpha
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                if param.grad is None:
                    continue
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    r_at = alpha * param.grad / norm
                    param.data.add_(r_at)
                    param.data = self.project(name, param.data, epsilon)

    def restore(self, emb_name: str | None = None) -> None:
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if name not in self.emb_backup:
                    raise RuntimeError(f"restore() without attack(): no backup of {name!r}")
                param.data = self.emb_backup[name]
        self.emb_backup = {}

    def project(self, param_name: str, param_data: torch.Tensor, epsilon: float) -> torch.Tensor:
        r = param_data - self.emb_backup[param_name]
        if torch.norm(r) > epsilon:
            r = epsilon * r / torch.norm(r)
        return self.emb_backup[param_name] + r

    def backup_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and name in self.grad_backup:
                param.grad = self.grad_backup[name]
