"""Fused drop-in FGM and FGSM (docs/methods.md §1 (FGM), §2 (FGSM)).

Same constructor, methods and numbers as the community classes (fused_adv.reference), but the
attack is two multi-tensor passes (a norm reduction over the grads, then one pass that reads P
and G and writes the backup and P) with the zero/NaN guard on the device: no host sync.
Restore is one multi-tensor copy, bit-exact.
"""
from __future__ import annotations

import torch
from torch import nn

from fused_adv import ops
from fused_adv.methods._common import (AttackStateError, Attacked, BackupPool, Perturbation, check_restore_mode,
                                       no_grad, no_gradient_error, select_by_name)


class FGM(Perturbation):
    """``FGM(model, emb_name='word_embeddings', epsilon=1.0, *, backend='auto', restore_mode='copy')``.

    ``attack(epsilon=None, emb_name=None)`` perturbs every trainable parameter whose name contains
    ``emb_name``: P <- P + epsilon*G/||G|| (skipped when ||G|| is 0 or NaN), after backing P up.
    ``restore()`` puts the backed-up weights back bit for bit (``restore_mode="swap"``: by
    re-pointing ``param.data`` at the backup as the community class does, no copy; opt-in).
    ``with fgm.perturbed(): ...`` does both and restores even if the block raises.  Raises ValueError when ``emb_name``
    matches no trainable parameter, AttackStateError on restore() without attack() or on a
    second attack() before restore().
    """

    def __init__(self, model: nn.Module, emb_name: str = "word_embeddings", epsilon: float = 1.0, *,
                 backend: str = "auto", restore_mode: str = "copy"):
        """Stores the arguments (``backend``: 'auto' | 'cuda' | 'triton' | 'cpp' | 'torch';
        ``restore_mode``: 'copy' | 'swap').  Allocates nothing until the first attack.  Raises
        ValueError for an unknown ``restore_mode``."""
        self.model = model
        self.emb_name = emb_name
        self.epsilon = epsilon
        self.backend = backend
        self.restore_mode = check_restore_mode(restore_mode)
        self._pool = BackupPool()
        self._attacked: list[tuple[nn.Parameter, torch.Tensor]] | None = None  # (param, backup)
        self._clean = None  # DeepSpeed ZeRO-1/2: the clean gradients, added back at restore()

    def _perturb(self, loc, backups, epsilon: float) -> None:
        sumsq = loc.reduce(ops.multi_tensor_sumsq(loc.grads, backend=self.backend))
        ops.fgm_perturb_(loc.params, loc.grads, backups, sumsq, epsilon, True, backend=self.backend)

    @no_grad
    def attack(self, epsilon: float | None = None, emb_name: str | None = None) -> None:
        """Backs up, then perturbs in place, every trainable parameter whose name contains
        ``emb_name`` (:func:`fused_adv.methods._common.select_by_name`; tied weights once).

        Parameters of any shape and float dtype (fp32/fp16/bf16), each with its ``.grad`` of the
        same shape and dtype.  Those without a ``.grad`` are backed up but not moved.  The
        backups live in a pool reused every step (one copy of the perturbed weights; under
        sharding, of this rank's pieces).  ``.grad`` is read, not changed.  ``epsilon`` /
        ``emb_name`` override the constructor's for this call.  Raises AttackStateError when
        already attacked (restore first), ValueError when ``emb_name`` matches no trainable
        parameter, BackendUnavailableError when the backend cannot run on the parameters'
        device/dtype, fused_adv.sharding.ShardingError for layouts it cannot work on.
        """
        if self._attacked is not None:
            raise AttackStateError(f"{type(self).__name__}.attack() called twice without restore(); "
                                   "call restore() after the adversarial backward")
        epsilon = self.epsilon if epsilon is None else epsilon
        self._sharding()
        pattern = self.emb_name if emb_name is None else emb_name
        named = select_by_name(self.model, pattern, what="emb_name")
        chosen = [p for _, p in named]
        loc = self._localize(chosen, [p.grad for p in chosen], [n for n, _ in named])
        if not loc.live and not loc.sharded:  # sharded: a rank may hold no piece; ZeRO checks its own state
            raise no_gradient_error(type(self).__name__, "emb_name", pattern)
        backups = self._pool.get(chosen, like=loc.locals)
        all_live = len(loc.live) == len(chosen)
        if not all_live:
            live = set(loc.live)
            # Parameters without a grad are backed up (restore is uniform) but not moved.
            for i, piece in enumerate(loc.locals):
                if i not in live:
                    backups[i].copy_(piece)
        if loc.live or loc.sharded:  # every rank joins the collectives, also with nothing local
            self._perturb(loc, backups if all_live else [backups[i] for i in loc.live], epsilon)
        self._attacked = Attacked(chosen, backups)
        ds = self._deepspeed()
        if ds is not None and not ds.accumulates:
            # ZeRO-1/2: the adversarial engine.backward REPLACES the gradients; keep the clean ones
            # and add them back at restore() (FGM trains on clean + adversarial).
            self._clean = ds.store.copy()
            ds.store.zero()

    @no_grad
    def restore(self, *_args, **_kwargs) -> None:
        """Puts the backed-up weights back bit for bit (:meth:`Perturbation.restore`).  Under
        DeepSpeed ZeRO-1/2, whose ``engine.backward`` replaces the gradients instead of adding to
        them, it also adds the clean gradients set aside by :meth:`attack` to the adversarial
        ones (clean + adversarial, as everywhere else).  Raises AttackStateError when nothing is
        attacked."""
        super().restore()
        if self._clean is not None:
            clean, self._clean = self._clean, None
            self._deepspeed().store.add(clean)


class FGSM(FGM):
    """``FGSM(model, emb_name='word_embeddings', epsilon=1.0, *, backend='auto', restore_mode='copy')``:
    the sign variant, P <- P + epsilon*sign(G) (no norm, no skip rule).  Same API, errors and
    restore as :class:`FGM`."""

    def _perturb(self, loc, backups, epsilon: float) -> None:
        ops.fgsm_perturb_(loc.params, loc.grads, backups, epsilon, True, backend=self.backend)
