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

        embeds = freelb.embedding(input_ids)
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
                embeds = freelb.embedding(input_ids)                  # looked up again, as the original
        return total / K, None
