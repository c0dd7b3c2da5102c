"""Fused drop-in PGD (docs/methods.md §3 (PGD)).

Each attack step is one multi-tensor reduction (||G||^2, <P-B, G>, ||P-B||^2) and one update
pass: the projection onto the epsilon-ball follows analytically from those three numbers, so
P is read and written once per step.  ``backup_grad()`` sets the clean gradients aside instead
of cloning them (no copy; the grads are handed back by ``restore_grad()``).
"""
from __future__ import annotations

import torch
from torch import nn

from fused_adv import ops
from fused_adv.methods._common import (AttackStateError, BackupPool, Perturbation, check_restore_mode, data_of,
                                       no_gradient_error, params_with_grad, select_by_name)


class PGD(Perturbation):
    """``PGD(model, epsilon=1.0, alpha=0.3, emb_name='word_embeddings', *, backend='auto',
    restore_mode='copy')``.

    Loop (K steps), exactly as with the community class::

        loss.backward(); pgd.backup_grad()
        for t in range(K):
            pgd.attack(is_first_attack=(t == 0))
            if t != K - 1: model.zero_grad()
            else: pgd.restore_grad()
            model(x).loss.backward()
        pgd.restore(); optimizer.step()

    Difference from the community class, same results in that loop: ``backup_grad()`` moves the
    clean ``.grad`` tensors aside (``.grad`` becomes None) and ``attack()`` reads a set-aside
    gradient where ``.grad`` is None; ``restore_grad()`` hands back every set-aside gradient
    (the community class restores only parameters whose ``.grad`` is not None at that moment).
    """

    def __init__(self, model: nn.Module, epsilon: float = 1.0, alpha: float = 0.3,
                 emb_name: str = "word_embeddings", *, backend: str = "auto", restore_mode: str = "copy"):
        """Stores the arguments (``backend``: 'auto' | 'cuda' | 'triton' | 'cpp' | 'torch';
        ``restore_mode``: 'copy' | 'swap').  Allocates nothing until the first attack.  Raises
        ValueError for an unknown ``restore_mode``."""
        self.model = model
        self.epsilon = epsilon
        self.alpha = alpha
        self.emb_name = emb_name
        self.backend = backend
        self.restore_mode = check_restore_mode(restore_mode)
        self._pool = BackupPool()
        self._attacked: list[tuple[nn.Parameter, torch.Tensor]] | None = None  # (param, backup)
        self._grads_aside: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._clean = None         # DeepSpeed ZeRO-1/2/3: copy of the clean gradients (backup_grad)
        self._clean_due = False    # restore_grad() was called: restore() adds them back

    def _grad(self, p: nn.Parameter):
        if p.grad is not None:
            return p.grad
        for q, g in self._grads_aside:
            if q is p:
                return g
        return None

    @torch.no_grad()
    def attack(self, is_first_attack: bool = False, epsilon: float | None = None, alpha: float | None = None,
               emb_name: str | None = None) -> None:
        """One ascent step, in place, on every trainable parameter whose name contains
        ``emb_name``: ``P += alpha * G/||G||`` (skipped on the device when ||G|| is 0 or NaN), then
        P is projected onto the L2 ball of radius ``epsilon`` around its backup B.

        ``is_first_attack`` backs the selected parameters up (into a reused pool) first.  G is
        ``.grad``, or the gradient set aside by :meth:`backup_grad` when ``.grad`` is None;
        parameters with neither are backed up but not moved.  Any float dtype; G has P's shape
        and dtype.  ``epsilon`` / ``alpha`` / ``emb_name`` override the constructor's.  Raises
        AttackStateError for a first attack while attacked, a later step before a first one, or a
        later step whose ``emb_name`` selects parameters the first did not back up; ValueError
        when ``emb_name`` matches no trainable parameter.
        """
        epsilon = self.epsilon if epsilon is None else epsilon
        alpha = self.alpha if alpha is None else alpha
        self._sharding()
        pattern = self.emb_name if emb_name is None else emb_name
        named = select_by_name(self.model, pattern, what="emb_name")
        chosen = [p for _, p in named]
        grads = [self._grad(p) for p in chosen]
        loc = self._localize(chosen, grads, [n for n, _ in named])
        if is_first_attack:
            if self._attacked is not None:
                raise AttackStateError("PGD.attack(is_first_attack=True) called again before restore()")
            backups = self._pool.get(chosen, like=loc.locals)
        else:
            if self._attacked is None:
                raise AttackStateError("PGD.attack(is_first_attack=False) before a first attack: "
                                       "call attack(is_first_attack=True) at step 0")
            known = {id(p): b for p, b in self._attacked}
            backups = [known.get(id(p)) for p in chosen]
            if any(b is None for b in backups):
                raise AttackStateError("PGD.attack(): emb_name selects parameters that the first attack "
                                       "did not back up; use the same emb_name for every step")
        live = set(loc.live)
        if not loc.live and not loc.sharded:  # sharded: a rank may hold no piece; ZeRO checks its own state
            raise no_gradient_error("PGD", "emb_name", pattern)
        if is_first_attack:
            for i, piece in enumerate(loc.locals):
                if i not in live:
                    backups[i].copy_(piece)
        if loc.live or loc.sharded:
            B = [backups[i] for i in loc.live]
            stats = loc.reduce(ops.pgd_reduce(loc.params, loc.grads, B, is_first_attack, backend=self.backend))
            ops.pgd_perturb_(loc.params, loc.grads, B, stats, alpha, epsilon, is_first_attack, backend=self.backend)
        if is_first_attack:
            self._attacked = list(zip(chosen, backups))
        ds = self._deepspeed()
        if ds is not None and self._clean is not None:
            # These gradients are used: empty ZeRO's buffers so that the next engine.backward starts
            # from zero, whether it adds to them (ZeRO-3) or replaces them (ZeRO-1/2);
            # engine.zero_grad() does not reach them.
            ds.store.zero()

    @torch.no_grad()
    def restore(self, *_args, **_kwargs) -> None:
        """Puts the backed-up weights back bit for bit (:meth:`Perturbation.restore`).  Under
        DeepSpeed ZeRO-1/2/3, after :meth:`restore_grad`, it also adds the clean gradients copied by
        :meth:`backup_grad` to the last adversarial ones (clean + last adversarial).  Raises
        AttackStateError when nothing is attacked."""
        super().restore()
        if self._clean is not None and self._clean_due:
            clean, self._clean, self._clean_due = self._clean, None, False
            self._deepspeed().store.add(clean)

    def backup_grad(self) -> None:
        """Sets the clean gradients aside without copying them: every trainable parameter that has
        a ``.grad`` (:func:`fused_adv.methods._common.params_with_grad`) keeps a reference to it
        here and its ``.grad`` becomes None (so the next backward starts from zero).  An earlier
        set-aside that was not handed back is replaced.  Under DeepSpeed ZeRO-1/2/3 (the engine owns
        the gradients; ``.grad`` is None) it copies this rank's gradient partitions instead, and
        each following :meth:`attack` empties the engine's after reading them.  Raises
        ShardingError (a ValueError) when a ZeRO engine holds no gradients, else nothing."""
        ds = self._deepspeed()
        if ds is not None:  # ZeRO owns the gradients: copy this rank's partitions
            self._clean, self._clean_due = ds.store.copy(), False
            return
        self._grads_aside = [(p, p.grad) for p in params_with_grad(self.model)]
        for p, _ in self._grads_aside:
            p.grad = None

    def restore_grad(self) -> None:
        """Hands every set-aside clean gradient back as ``.grad`` (replacing whatever ``.grad`` holds
        now; the next backward adds to it) and forgets them.  Without a prior
        :meth:`backup_grad` it does nothing.  Under DeepSpeed ZeRO-1/2/3 the clean gradients are
        added to the engine's at :meth:`restore`, after the last adversarial backward (a ZeRO-1/2
        backward replaces the gradients).  Raises nothing."""
        if self._clean is not None:  # DeepSpeed ZeRO: a ZeRO-1/2 backward would replace them, so they
            self._clean_due = True   # are added to the engine's at restore() instead
            return
        for p, g in self._grads_aside:
            p.grad = g
        self._grads_aside = []

    def _attack_defaults(self, kwargs: dict) -> dict:
        """``perturbed()`` takes a first attack step unless one was already taken."""
        return {"is_first_attack": self._attacked is None, **kwargs}
