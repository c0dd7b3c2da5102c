"""The ``foreach`` benchmark provider: FGM / FGSM / PGD / AWP bookkeeping rewritten by hand in
``torch._foreach_*`` ops, the peer a PyTorch expert would write instead of using fused_adv.

Same math and the same numbers as the community classes (fused_adv.reference; pinned by
tests/test_bench_cli.py), but no per-tensor host sync: the zero/NaN-norm guard
(docs/methods.md §10 (Cross-cutting rules)) is a device-side ``torch.where`` instead of
``if norm != 0``, the parameter lists are collected once, the backups are preallocated and
restored by ``_foreach_copy_``.  The per-element arithmetic keeps the community order
(``eps * G / ||G||`` in the parameter's dtype) so the results match bit for bit where the
community class's own ops are deterministic.

Not part of the public API: the classes take only the arguments the benchmark uses.
"""
from __future__ import annotations

import torch


def _params(model, name: str) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if p.requires_grad and name in n]


def _set_guarded(P, new, norms) -> None:
    """``P[i] = new[i]`` where the i-th gradient norm is neither 0 nor NaN, else P[i] is left as
    it is (the community skip rule, evaluated on the device; written in place)."""
    for p, a, n in zip(P, new, norms):
        torch.where((n != 0) & ~n.isnan(), a, p, out=p)


class FGM:
    """``attack()`` / ``restore()`` on the parameters whose name contains ``emb_name``:
    P <- P + epsilon * G / ||G|| (docs/methods.md §1 (FGM))."""

    def __init__(self, model, emb_name: str = "word_embeddings", epsilon: float = 1.0):
        self.params = _params(model, emb_name)
        self.epsilon = epsilon
        self.backup = [torch.empty_like(p) for p in self.params]

    def _step(self, P, G) -> None:
        norms = torch._foreach_norm(G)
        r = torch._foreach_mul(G, self.epsilon)
        torch._foreach_div_(r, norms)
        torch._foreach_add_(r, P)  # P + r (IEEE addition commutes: the community's add_)
        _set_guarded(P, r, norms)

    def attack(self) -> None:
        torch._foreach_copy_(self.backup, [p.detach() for p in self.params])
        with_grad = [p for p in self.params if p.grad is not None]
        if with_grad:
            self._step([p.detach() for p in with_grad], [p.grad for p in with_grad])

    def restore(self) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], self.backup)


class FGSM(FGM):
    """P <- P + epsilon * sign(G) (docs/methods.md §2 (FGSM)); no guard."""

    def _step(self, P, G) -> None:
        r = torch._foreach_sign(G)
        torch._foreach_mul_(r, self.epsilon)
        torch._foreach_add_(P, r)


class PGD:
    """``backup_grad()``, ``attack(is_first_attack)``, ``restore_grad()``, ``restore()``
    (docs/methods.md §3 (PGD)): P <- B + proj_eps(P + alpha * G / ||G|| - B).  The clean gradients
    are set aside by reference (the next backward writes new .grad tensors after a
    ``zero_grad(set_to_none=True)``), as the fused class does."""

    def __init__(self, model, epsilon: float = 1.0, alpha: float = 0.3, emb_name: str = "word_embeddings"):
        self.model, self.epsilon, self.alpha = model, epsilon, alpha
        self.params = _params(model, emb_name)
        self.backup = [torch.empty_like(p) for p in self.params]
        self.grad_backup: list = []

    def attack(self, is_first_attack: bool = False) -> None:
        if is_first_attack:
            torch._foreach_copy_(self.backup, [p.detach() for p in self.params])
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        P, G, B = [self.params[i].detach() for i in idx], [self.params[i].grad for i in idx], [self.backup[i] for i in idx]
        gn = torch._foreach_norm(G)
        R = torch._foreach_mul(G, self.alpha)
        torch._foreach_div_(R, gn)
        torch._foreach_add_(R, P)
        torch._foreach_sub_(R, B)                    # r = (P + alpha * G / ||G||) - B
        rn = torch._foreach_norm(R)
        scaled = torch._foreach_mul(R, self.epsilon)
        torch._foreach_div_(scaled, rn)              # epsilon * r / ||r||
        for r, s, n in zip(R, scaled, rn):
            torch.where(n > self.epsilon, s, r, out=r)
        torch._foreach_add_(R, B)                    # B + r
        _set_guarded(P, R, gn)

    def restore(self) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], self.backup)

    def backup_grad(self) -> None:
        self.grad_backup = [(p, p.grad) for p in self.model.parameters() if p.requires_grad and p.grad is not None]

    def restore_grad(self) -> None:
        for p, g in self.grad_backup:
            if p.grad is not None:
                p.grad = g
        self.grad_backup = []


class AWP:
    """``attack_step()`` / ``restore()`` (and ``attack_backward`` with the Kaggle adversarial
    pass) on the parameters whose name contains ``adv_param`` and that have a gradient
    (docs/methods.md §4 (AWP (Kaggle))):
    P <- clamp(P + adv_lr * G / (||G|| + 1e-6) * (||P|| + 1e-6), B -+ adv_eps * |B|).
    The box is recomputed from the backup at each step (the same values the community class
    keeps as two extra copies)."""

    def __init__(self, model, optimizer, adv_param: str = "weight", adv_lr: float = 1.0, adv_eps: float = 0.2,
                 adv_step: int = 1):
        self.model, self.optimizer = model, optimizer
        self.adv_lr, self.adv_eps, self.adv_step = adv_lr, adv_eps, adv_step
        self.params = _params(model, adv_param)
        self.backup = [torch.empty_like(p) for p in self.params]
        self.active: list[int] = []

    def save(self) -> None:
        self.active = [i for i, p in enumerate(self.params) if p.grad is not None]
        torch._foreach_copy_([self.backup[i] for i in self.active], [self.params[i].detach() for i in self.active])

    def attack_step(self) -> None:
        if not self.active:
            return
        P = [self.params[i].detach() for i in self.active]
        G, B = [self.params[i].grad for i in self.active], [self.backup[i] for i in self.active]
        gn, pn = torch._foreach_norm(G), torch._foreach_norm(P)
        r = torch._foreach_mul(G, self.adv_lr)
        torch._foreach_div_(r, torch._foreach_add(gn, 1e-6))
        torch._foreach_mul_(r, torch._foreach_add(pn, 1e-6))
        torch._foreach_add_(r, P)                    # P + adv_lr * G / (|G| + e) * (|P| + e)
        e = torch._foreach_abs(B)
        torch._foreach_mul_(e, self.adv_eps)         # adv_eps * |B|
        torch._foreach_maximum_(r, torch._foreach_sub(B, e))
        torch._foreach_add_(e, B)                    # the upper bound B + adv_eps * |B|, in place
        torch._foreach_minimum_(r, e)
        _set_guarded(P, r, gn)

    def restore(self) -> None:
        torch._foreach_copy_([self.params[i].detach() for i in self.active], [self.backup[i] for i in self.active])
        self.active = []

    def attack_backward(self, x=None, y=None, attention_mask=None, epoch: int = 0):
        """Save; ``adv_step`` x (perturb, the Kaggle adversarial pass: loss of
        ``model(input_ids=x, attention_mask=attention_mask, labels=y)``, ``optimizer.zero_grad()``,
        backward); restore.  Returns the last adversarial loss."""
        self.save()
        loss = None
        try:
            for _ in range(self.adv_step):
                self.attack_step()
                out = self.model(input_ids=x, attention_mask=attention_mask, labels=y)
                loss = out if isinstance(out, torch.Tensor) else out[0]
                self.optimizer.zero_grad()
                loss.backward()
        finally:
            self.restore()
        return loss


class SAM:
    """``first_step()`` / ``second_step()`` of davda54's SAM / ASAM (docs/methods.md §11 (SAM)) over
    ``params`` (a list, one group): the norms by ``torch._foreach_norm`` and one stacked norm, the
    climb by foreach chains in the parameter's dtype (the reference's order:
    ``(P^2 if adaptive else 1) * G * scale``), preallocated backups restored by ``_foreach_copy_``
    (the reference clones a new backup every step and re-points ``.data``).  No host sync.
    ``base_step`` is called after the restore (the base optimizer's step)."""

    def __init__(self, params, rho: float = 0.05, adaptive: bool = False, base_step=None):
        self.params = [p for p in params if p.requires_grad]
        self.rho, self.adaptive, self.base_step = rho, adaptive, base_step
        self.backup = [torch.empty_like(p) for p in self.params]
        self.active: list[int] = []

    def first_step(self) -> None:
        self.active = [i for i, p in enumerate(self.params) if p.grad is not None]
        P = [self.params[i].detach() for i in self.active]
        G, B = [self.params[i].grad for i in self.active], [self.backup[i] for i in self.active]
        if self.adaptive:
            t = torch._foreach_abs(P)
            torch._foreach_mul_(t, G)
            norms = torch._foreach_norm(t)
        else:
            norms = torch._foreach_norm(G)
        scale = self.rho / (torch.linalg.vector_norm(torch.stack(norms)) + 1e-12)
        torch._foreach_copy_(B, P)
        if self.adaptive:
            e = torch._foreach_mul(P, P)
            torch._foreach_mul_(e, G)
        else:
            e = torch._foreach_mul(G, 1.0)
        torch._foreach_mul_(e, scale.to(P[0].dtype))
        torch._foreach_add_(P, e)

    def second_step(self) -> None:
        torch._foreach_copy_([self.params[i].detach() for i in self.active], [self.backup[i] for i in self.active])
        self.active = []
        if self.base_step is not None:
            self.base_step()
