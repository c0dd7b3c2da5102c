"""yopo: 1 + adv_steps passes on ``inputs_embeds = embed(input_ids) + delta``, no clean pass, the
parameter grads accumulating the mean of the passes' gradients, with ``yopo_steps`` Hamiltonian
inner steps on the first layer before every pass but the first (docs/hf.md, "yopo";
docs/methods.md §8 (FreeAT and YOPO))."""
from __future__ import annotations

from collections.abc import Mapping

import torch

import fused_adv
from fused_adv._shared import capture_output_grad, first_layer_of, freelb_init_delta

from ..passes import instance_override, unwrap
from .base import Strategy, check_at_least_one


class YOPOStrategy(Strategy):
    """``fused_adv.YOPO`` through the Trainer: each full pass is the Trainer's step with its loss
    divided by 1 + adv_steps at the backward (``accelerator.backward(loss / (1 + adv_steps))``),
    the co-state p captured at the first layer's output during that backward; the inner steps run
    the unwrapped model up to the first layer (``autograd.grad`` w.r.t. delta only: no parameter
    gradient, no DDP reduction).  Returns the mean of the passes' losses, no ``adv_loss``."""

    name = "yopo"
    method_class = fused_adv.YOPO

    @classmethod
    def validate(cls, cfg) -> None:
        check_at_least_one(cfg.method_kwargs, "adv_steps")
        check_at_least_one(cfg.method_kwargs, "yopo_steps")

    def __init__(self, trainer, model, cfg):
        super().__init__(trainer, model, cfg)
        self.base = unwrap(trainer, model)
        self.attacker = fused_adv.YOPO(model=self.base, backend=cfg.backend, **cfg.method_kwargs)
        if self.attacker.embedding is None:
            self.attacker.embedding = self.base.get_input_embeddings()
        self.layer = first_layer_of(self.base, self.attacker.first_layer)

    def step(self, passes):
        yopo, trainer = self.attacker, passes.trainer
        prepared = trainer._prepare_inputs(passes.inputs)          # once: every pass reuses it
        if not isinstance(prepared, Mapping) or "input_ids" not in prepared:
            raise ValueError("YOPO replaces the batch's 'input_ids' by 'inputs_embeds', but this batch has no "
                             f"'input_ids' (keys: {sorted(prepared) if isinstance(prepared, Mapping) else '?'})")
        base = dict(prepared)
        input_ids = base.pop("input_ids")
        mask = base.get("attention_mask")
        if mask is None:                                 # no padding: every token counts in the init
            mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        n = 1 + int(yopo.adv_steps)
        backward = trainer.accelerator.backward

        def backward_mean_of_n(loss, **kw):
            return backward(loss / n, **kw)

        embeds = yopo.embedding(input_ids)
        delta = freelb_init_delta(embeds, mask, yopo.adv_init_mag, "l2").contiguous()
        delta.requires_grad_()
        box, total = {}, None
        with instance_override(trainer.accelerator, "backward", backward_mean_of_n):
            for k in range(n):
                if k > 0:
                    if "grad" not in box:
                        raise RuntimeError(f"YOPO: the first layer ({type(self.layer).__name__}) got no gradient: "
                                           "it must lie between the embeddings and the loss")
                    const = yopo.embedding(input_ids).detach()
                    yopo.inner_steps(self.base, self.layer, base, box.pop("grad"), delta, const)
                    embeds = yopo.embedding(input_ids)                # looked up again, as the original
                batch = dict(base, inputs_embeds=delta + embeds)
                last = k == n - 1
                # every pass's parameter grad is KEPT: the non-final passes skip DDP's all-reduce,
                # the final (synchronised) backward reduces the accumulated sum (as freelb)
                with capture_output_grad(self.layer, box):
                    loss = passes.adversarial(batch, no_sync=not last, use_super=(k == 0))
                total = loss if total is None else total + loss
        return total / n, None
