"""Fused drop-in MI-FGSM (docs/methods.md §2b (MI-FGSM)).

PGD's loop and gradient bookkeeping (fused_adv.methods.pgd.PGD: the clean gradients are set aside,
not cloned) with the momentum step: each attack is one multi-tensor L1 reduction (||G||_1 per
tensor) and one update pass that writes the momentum M, the parameter P (sign step and box
projection) and, on the first step, the backup B.  The zero/NaN guard is decided on the device.
"""
from __future__ import annotations

import torch
from torch import nn

from fused_adv import ops
from fused_adv.methods._common import (AttackStateError, BackupPool, check_restore_mode, no_gradient_error,
                                       select_by_name)
from fused_adv.methods.pgd import PGD


class MIFGSM(PGD):
    """``MIFGSM(model, epsilon=1.0, steps=3, decay=1.0, emb_name='word_embeddings', *,
    backend='auto', restore_mode='copy')``: fused drop-in for fused_adv.reference.MIFGSM.

    alpha = epsilon / steps.  Loop (``steps`` = T attacks), as with PGD::

        loss.backward(); adv.backup_grad()
        for t in range(T):
            adv.attack(is_first_attack=(t == 0))
            if t != T - 1: model.zero_grad()
            else: adv.restore_grad()
            model(x).loss.backward()
        adv.restore(); optimizer.step()

    Methods ``backup_grad``, ``restore_grad``, ``restore``, ``perturbed`` and ``is_attacked`` are
    PGD's (``backup_grad`` moves the clean ``.grad`` tensors aside instead of cloning them).  Extra
    memory: the backups and the momenta (two copies of the perturbed weights).
    """

    def __init__(self, model: nn.Module, epsilon: float = 1.0, steps: int = 3, decay: float = 1.0,
                 emb_name: str = "word_embeddings", *, backend: str = "auto", restore_mode: str = "copy"):
        """Stores the arguments (``backend``: 'auto' | 'cuda' | 'triton' | 'cpp' | 'torch';
        ``restore_mode``: 'copy' | 'swap').  Allocates nothing until the first attack.  Raises
        ValueError when ``steps`` < 1 or for an unknown ``restore_mode``."""
        if int(steps) < 1:
            raise ValueError(f"MIFGSM: steps must be >= 1, got {steps}")
        super().__init__(model, epsilon=epsilon, alpha=epsilon / int(steps), emb_name=emb_name,
                         backend=backend, restore_mode=check_restore_mode(restore_mode))
        self.steps = int(steps)
        self.decay = decay
        self._momenta = BackupPool()

    @torch.no_grad()
    def attack(self, is_first_attack: bool = False, emb_name: str | None = None) -> None:
        """One momentum step, in place, on every trainable parameter whose name contains
        ``emb_name``: ``M = decay*M + G/||G||_1`` (M = 0 before the first step), ``P += alpha*sign(M)``,
        P clamped to ``B -+ epsilon``; a parameter whose ||G||_1 is 0 or NaN is skipped (decided on
        the device).  ``is_first_attack`` backs the parameters up first (reused buffers).  G is
        ``.grad``, or the gradient set aside by :meth:`backup_grad`; parameters with neither are
        backed up but not moved.  Any float dtype; M has P's dtype.  Raises AttackStateError for a
        first attack while attacked, a later step before a first one, or a later step whose
        ``emb_name`` selects parameters the first did not back up; ValueError when ``emb_name``
        matches no trainable parameter; NoGradientError (a ValueError) when none of the chosen
        parameters has a gradient; fused_adv.sharding.ShardingError for layouts it cannot work
        on (restore_mode='swap' on sharded parameters, Partial placements, FSDP1 without
        use_orig_params).  Sharded parameters: momenta and backups are local-shard sized."""
        self._sharding()
        named = select_by_name(self.model, self.emb_name if emb_name is None else emb_name, what="emb_name")
        chosen = [p for _, p in named]
        # Under sharding (docs/methods.md §12 (Sharded training)) the kernels run on this rank's
        # pieces and ||G||_1 is the sum of the pieces' L1 norms: one all_reduce, no host sync.
        loc = self._localize(chosen, [self._grad(p) for p in chosen], [n for n, _ in named])
        if is_first_attack:
            if self._attacked is not None:
                raise AttackStateError("MIFGSM.attack(is_first_attack=True) called again before restore()")
            backups = self._pool.get(chosen, like=loc.locals)
            momenta = self._momenta.get(chosen, like=loc.locals)
        else:
            if self._attacked is None:
                raise AttackStateError("MIFGSM.attack(is_first_attack=False) before a first attack: "
                                       "call attack(is_first_attack=True) at step 0")
            known = {id(p): (b, m) for p, b, m in self._state}
            pairs = [known.get(id(p)) for p in chosen]
            if any(x is None for x in pairs):
                raise AttackStateError("MIFGSM.attack(): emb_name selects parameters that the first attack "
                                       "did not back up; use the same emb_name for every step")
            backups = [b for b, _ in pairs]
            momenta = [m for _, m in pairs]
        live = set(loc.live)
        if not loc.live and not loc.sharded:  # sharded: a rank may hold no piece; ZeRO checks its own state
            raise no_gradient_error("MIFGSM", "emb_name", self.emb_name if emb_name is None else emb_name)
        if is_first_attack:
            for i, piece in enumerate(loc.locals):
                if i not in live:   # backed up, momentum 0, not moved (as the reference)
                    backups[i].copy_(piece)
                    momenta[i].zero_()
        if loc.live or loc.sharded:  # every rank joins the collective, also with nothing local
            n1 = loc.reduce(ops.multi_tensor_abssum(loc.grads, backend=self.backend))
            ops.mifgsm_perturb_(loc.params, loc.grads, [momenta[i] for i in loc.live],
                                [backups[i] for i in loc.live], n1, self.alpha, self.epsilon, self.decay,
                                is_first_attack, backend=self.backend)
        if is_first_attack:
            self._attacked = list(zip(chosen, backups))
            self._state = list(zip(chosen, backups, momenta))
        ds = self._deepspeed()
        if ds is not None and self._clean is not None:
            # As PGD.attack: these gradients are used; empty ZeRO's buffers so that the next
            # engine.backward starts from zero (ZeRO-3 adds to them, ZeRO-1/2 replace them) and the
            # clean gradients copied by backup_grad are added back at restore().
            ds.store.zero()

    def extra_memory_bytes(self) -> int:
        """Bytes held by the backups and the momenta (two copies of the perturbed weights)."""
        return self._pool.nbytes() + self._momenta.nbytes()
