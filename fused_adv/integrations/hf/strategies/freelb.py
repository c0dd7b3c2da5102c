"""freelb: K passes on ``inputs_embeds = embed(input_ids) + delta``, no clean pass, the parameter
grads accumulating the mean of the K adversarial gradients (docs/hf.md, "freelb";
docs/methods.md §6 (FreeLB))."""
from __future__ import annotations

from collections.abc import Mapping

import torch

import fused_adv

from ..passes import instance_override, unwrap
from .base import Strategy, check_at_least_one


class FreeLBStrategy(Strategy):
    """``fused_adv.FreeLB`` through the Trainer: each pass is the Trainer's step with its loss
    divided by K at the backward (``accelerator.backward(loss / K)``); a fused ascent step on delta
    between passes, none after the last.  Returns the mean adversarial loss, no ``adv_loss``."""

    name = "freelb"
    method_class = fused_adv.FreeLB

    @classmethod
    def validate(cls, cfg) -> None:
        check_at_least_one(cfg.method_kwargs, "adv_K")

    def __init__(self, trainer, model, cfg):
        super().__init__(trainer, model, cfg)
        self.attacker = fused_adv.FreeLB(backend=cfg.backend, **cfg.method_kwargs)
        if self.attacker.embedding is None:
            self.attacker.embedding = unwrap(trainer, model).get_input_embeddings()

    def step(self, passes):
        freelb, trainer = self.attacker, passes.trainer
        prepared = trainer._prepare_inputs(passes.inputs)          # once: every pass reuses it
        if not isinstance(prepared, Mapping) or "input_ids" not in prepared:
            raise ValueError("FreeLB replaces the batch's 'input_ids' by 'inputs_embeds', but this batch has no "
                             f"'input_ids' (keys: {sorted(prepared) if isinstance(prepared, Mapping) else '?'})")
        base = dict(prepared)
        input_ids = base.pop("input_ids")
        mask = base.get("attention_mask")
        if mask is None:                                 # no padding: every token counts in the init
            mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        K = int(freelb.adv_K)
        backward = trainer.accelerator.backward

        def backward_mean_of_K(loss, **kw):
            return backward(loss / K, **kw)

        embeds = self._embed(input_ids)
        delta = freelb.init_delta(embeds, mask).contiguous()
        total = None
        with instance_override(trainer.accelerator, "backward", backward_mean_of_K):
            for k in range(K):
                delta.requires_grad_()
                batch = dict(base, inputs_embeds=delta + embeds)
                last = k == K - 1
                # Every pass's parameter grad is KEPT, so the non-final passes can skip DDP's
                # all-reduce exactly: the final (synchronised) backward reduces the accumulated sum.
                loss = passes.adversarial(batch, no_sync=not last, use_super=(k == 0))
                total = loss if total is None else total + loss
                if last:
                    break
                grad, delta.grad = delta.grad, None
                if grad is None:
                    raise RuntimeError("FreeLB: delta got no gradient: the model must take 'inputs_embeds' "
                                       "and its loss must depend on them")
                delta = freelb.update_delta(delta.detach(), grad)     # in place, fused
                embeds = self._embed(input_ids)                       # looked up again, as the original
        return total / K, None

    def _embed(self, input_ids):
        """The embedding lookup, called outside the model's forward.  Under FSDP2 (fully_shard)
        the weight is a sharded DTensor there: the FSDP unit that holds it is unsharded first
        (all-gather; its own forward then finds it unsharded, and its post-backward reduce-scatters
        the weight's gradient from this lookup together with the rest).  Under FSDP1 the weight
        outside forward is a 1-D piece of the flat shard: refused (docs/hf.md, "Sharded training")."""
        emb = self.attacker.embedding
        weight = getattr(emb, "weight", None)
        if weight is not None and getattr(weight, "_fsdp_flattened", False) and weight.dim() == 1:
            raise NotImplementedError(
                "adversarial='freelb' under FSDP1 (FullyShardedDataParallel): the embedding is looked up outside "
                "the model's forward, where FSDP1 holds only a 1-D piece of its weight. Use FSDP2 (accelerate: "
                "fsdp_version: 2; torch.distributed.fsdp.fully_shard), or adversarial='smart' / 'sift' (they "
                "perturb the embedding output inside the forward)")
        owner = _fsdp2_owner(self.model, weight)
        if owner is not None and owner is not emb:
            # The unit's post-backward fires when the gradient reaches ITS forward's inputs: with the
            # lookup outside that forward (inputs_embeds = embed + delta) the weight's gradient would
            # arrive after the reduce-scatter and be lost.  As its own unit, the embedding is
            # gathered by its own pre-forward and reduced at the end of the backward.
            raise NotImplementedError(
                "adversarial='freelb' under FSDP2: the input embedding must be its own fully_shard unit "
                "(fully_shard(model.get_input_embeddings()) before sharding the rest; accelerate: add the "
                "embedding class to fsdp_transformer_layer_cls_to_wrap), because FreeLB looks it up outside the "
                "model's forward")
        if owner is not None:
            # FSDP2 makes the first unit that runs forward the root: initialise the model's root
            # first, so the lookup does not claim that role (a no-op once initialised).
            root = _fsdp2_root(self.model)
            if root is not None:
                root._get_fsdp_state()._lazy_init()
        return emb(input_ids)


def _fsdp2_root(model):
    """The outermost FSDP2 module of ``model`` (model itself when fully_shard wrapped it)."""
    from torch.distributed.fsdp import FSDPModule
    return next((m for m in model.modules() if isinstance(m, FSDPModule)), None)


def _fsdp2_owner(model, weight):
    """The FSDP2 module (fully_shard) whose parameter group holds ``weight`` as a sharded
    DTensor, or None (plain weight, no FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return None
    if not isinstance(weight, DTensor):
        return None
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
        if group is not None and any(fp.sharded_param is weight for fp in group.fsdp_params):
            return m
    return None
