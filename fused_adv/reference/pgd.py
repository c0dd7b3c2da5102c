"""Community PGD class, step for step (docs/methods.md §3 (PGD)): the oracle for the fused one.

Usage (K steps): backward; backup_grad(); for t in range(K): attack(is_first_attack=t == 0);
zero_grad() except at t == K-1 where restore_grad(); adversarial forward/backward.  Then
restore(); optimizer.step().  Final grad = clean + last adversarial.
"""
from __future__ import annotations

import torch


class PGD:
    """``PGD(model, epsilon=1.0, alpha=0.3, emb_name='word_embeddings')``: the community PGD class.

    Args:
        model: the nn.Module whose parameters are perturbed.
        epsilon: radius of the L2 ball (over the whole tensor) around the backed-up weight.
        alpha: step length of each ascent step.
        emb_name: substring of the names of the parameters to perturb.

    State: ``emb_backup`` (name -> clone of the weight, from the first attack until restore) and
    ``grad_backup`` (name -> clone of the clean gradient, from backup_grad on).
    """

    def __init__(self, model, epsilon: float = 1.0, alpha: float = 0.3, emb_name: str = "word_embeddings"):
        """Stores the arguments (see the class docstring); allocates nothing.  Raises nothing."""
        self.model = model
        self.epsilon = epsilon
        self.alpha = alpha
        self.emb_name = emb_name
        self.emb_backup: dict[str, torch.Tensor] = {}
        self.grad_backup: dict[str, torch.Tensor] = {}

    def attack(self, is_first_attack: bool = False, epsilon: float | None = None, alpha: float | None = None,
               emb_name: str | None = None) -> None:
        """One ascent step on every trainable parameter whose name contains ``emb_name``.

        ``is_first_attack``: first clone each such parameter into ``emb_backup``.  Then, for each
        one with a ``.grad``: ``P += alpha * G/||G||`` (skipped when ||G|| is 0 or NaN) and
        ``param.data`` is re-pointed at the projection of P onto the ``epsilon`` L2 ball around
        its backup (:meth:`project`).  ``epsilon`` / ``alpha`` / ``emb_name`` override the
        constructor's.  Matching nothing does nothing.  Raises KeyError when a step that is not
        the first finds a parameter without backup (no first attack).
        """
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
        """Re-points ``param.data`` of every trainable parameter whose name contains ``emb_name``
        at its backup (no copy), then empties ``emb_backup``.  Raises RuntimeError when such a
        parameter has no backup (restore without a first attack)."""
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if name not in self.emb_backup:
                    raise RuntimeError(f"restore() without attack(): no backup of {name!r}")
                param.data = self.emb_backup[name]
        self.emb_backup = {}

    def project(self, param_name: str, param_data: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Returns ``B + r`` with ``r = P - B`` scaled onto the L2 ball of radius ``epsilon``
        (``r * epsilon/||r||`` when ||r|| > epsilon), B = ``emb_backup[param_name]``; a new tensor
        of P's shape and dtype.  Raises KeyError when there is no backup."""
        r = param_data - self.emb_backup[param_name]
        if torch.norm(r) > epsilon:
            r = epsilon * r / torch.norm(r)
        return self.emb_backup[param_name] + r

    def backup_grad(self) -> None:
        """Clones the ``.grad`` of every trainable parameter that has one into ``grad_backup``
        (the clean gradient; ``.grad`` itself is left as it is).  Raises nothing."""
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self) -> None:
        """Sets ``param.grad`` back to its clone in ``grad_backup`` for every trainable parameter
        whose ``.grad`` is not None at this moment (the community rule: a parameter whose grad was
        set to None since is NOT restored).  The next backward adds to the clean gradient.
        Raises nothing."""
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and name in self.grad_backup:
                param.grad = self.grad_backup[name]
