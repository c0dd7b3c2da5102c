"""MI-FGSM on the embedding weight, step for step (docs/methods.md §2b (MI-FGSM)): the oracle for
the fused class.

Dong et al. 2018's momentum iterative FGSM, written as the community PGD class is (same loop,
same gradient bookkeeping, same ``emb_name`` selection): alpha = epsilon/steps, momentum reset at
the first attack, M <- decay*M + G/||G||_1, P <- P + alpha*sign(M), P kept in the box B +- epsilon.
Usage (``steps`` = T attacks):

    loss.backward(); adv.backup_grad()
    for t in range(T):
        adv.attack(is_first_attack=(t == 0))
        if t != T - 1: model.zero_grad()
        else: adv.restore_grad()
        model(x).loss.backward()
    adv.restore(); optimizer.step()
"""
from __future__ import annotations

import torch


class MIFGSM:
    """``MIFGSM(model, epsilon=1.0, steps=3, decay=1.0, emb_name='word_embeddings')``.

    Args:
        model: the nn.Module whose parameters are perturbed.
        epsilon: half-width of the box (per element) around the backed-up weight.
        steps: number of attacks per batch, T; the step length is ``alpha = epsilon / steps``.
        decay: momentum decay mu.
        emb_name: substring of the names of the parameters to perturb.

    State: ``emb_backup`` and ``momentum`` (name -> tensor of the weight's shape and dtype, from the
    first attack until restore), ``grad_backup`` (name -> clone of the clean gradient).
    Raises ValueError when ``steps`` < 1.
    """

    def __init__(self, model, epsilon: float = 1.0, steps: int = 3, decay: float = 1.0,
                 emb_name: str = "word_embeddings"):
        """Stores the arguments; allocates nothing.  Raises ValueError when ``steps`` < 1."""
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.epsilon = epsilon
        self.steps = int(steps)
        self.alpha = epsilon / self.steps
        self.decay = decay
        self.emb_name = emb_name
        self.emb_backup: dict[str, torch.Tensor] = {}
        self.momentum: dict[str, torch.Tensor] = {}
        self.grad_backup: dict[str, torch.Tensor] = {}

    def attack(self, is_first_attack: bool = False, emb_name: str | None = None) -> None:
        """One momentum step on every trainable parameter whose name contains ``emb_name``.

        ``is_first_attack``: clone each such parameter into ``emb_backup`` and zero its momentum.
        Then, for each one with a ``.grad`` whose L1 norm is neither 0 nor NaN:
        ``M = decay*M + G/||G||_1``, ``P += alpha*sign(M)``, and ``param.data`` is re-pointed at
        ``clamp(P, B - epsilon, B + epsilon)``.  Raises KeyError when a step that is not the first
        finds no backup."""
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                    self.momentum[name] = torch.zeros_like(param.data)
                if param.grad is None:
                    continue
                norm = torch.norm(param.grad, p=1)
                if norm != 0 and not torch.isnan(norm):
                    self.momentum[name] = self.decay * self.momentum[name] + param.grad / norm
                    param.data.add_(self.alpha * torch.sign(self.momentum[name]))
                    param.data = self.project(name, param.data)

    def project(self, param_name: str, param_data: torch.Tensor) -> torch.Tensor:
        """``clamp(P, B - epsilon, B + epsilon)`` with B = ``emb_backup[param_name]``: a new tensor."""
        backup = self.emb_backup[param_name]
        return torch.clamp(param_data, backup - self.epsilon, backup + self.epsilon)

    def restore(self, emb_name: str | None = None) -> None:
        """Re-points ``param.data`` at its backup for every matching parameter, then forgets the
        backups and momenta.  Raises RuntimeError for a parameter without backup (no attack)."""
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if name not in self.emb_backup:
                    raise RuntimeError(f"restore() without attack(): no backup of {name!r}")
                param.data = self.emb_backup[name]
        self.emb_backup = {}
        self.momentum = {}

    def backup_grad(self) -> None:
        """Clones the ``.grad`` of every trainable parameter that has one into ``grad_backup``."""
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self) -> None:
        """Sets ``param.grad`` back to its clone for every trainable parameter whose ``.grad`` is not
        None at this moment (the community PGD rule)."""
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and name in self.grad_backup:
                param.grad = self.grad_backup[name]
