"""Validation: clean accuracy and accuracy under one fixed embedding-space attack.

The attack is the same for every run (the promise of adversarial training is robustness to
exactly this kind of perturbation, so it is measured, not assumed): K steps of projected gradient
ascent on the cross-entropy, applied to the word-embedding OUTPUT (what FGM, PGD and FreeLB
perturb during training), per token, in an L2 ball of radius ``eps`` around each real token's
embedding (padding is never perturbed):

    delta_0 = 0
    delta_{k+1} = Proj_{|delta_t| <= eps}( delta_k + alpha * g_t / |g_t| )   for every token t
    alpha = 2.5 * eps / K                                                     (Madry et al.'s choice)

No random start, model in eval mode (no dropout): the attack is deterministic, so every run is
scored against the same procedure.  The rows of all-MiniLM-L6-v2's word-embedding matrix have a
median L2 norm of 1.11, so eps = 0.3 moves each token by about a quarter of its own length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def clean_accuracy(model, val_batches) -> float:
    """Share of correct argmax predictions over ``val_batches`` (model in eval mode during the
    call, put back in train mode after)."""
    model.eval()
    correct = total = 0
    for b in val_batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        correct += (logits.argmax(-1) == b["labels"]).sum().item()
        total += b["labels"].numel()
    model.train()
    return correct / max(total, 1)


def attacked_accuracy(model, val_batches, eps: float, steps: int) -> float:
    """Accuracy under the per-token L2 PGD attack on the word-embedding output (module
    docstring).  ``eps`` = 0 or ``steps`` = 0 gives the clean accuracy.  The model's parameters
    get no gradient (``torch.autograd.grad`` w.r.t. delta only); it is in eval mode during the
    call and back in train mode after."""
    if eps <= 0 or steps <= 0:
        return clean_accuracy(model, val_batches)
    model.eval()
    emb = model.get_input_embeddings()
    alpha = 2.5 * eps / steps
    correct = total = 0
    for b in val_batches:
        mask = b["attention_mask"].unsqueeze(-1).to(torch.float32)
        with torch.no_grad():
            base = emb(b["input_ids"])
        delta = torch.zeros_like(base)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(inputs_embeds=base + delta, attention_mask=b["attention_mask"]).logits
            loss = F.cross_entropy(logits.float(), b["labels"], reduction="sum")
            g, = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                g = g * mask
                step = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta = delta.detach() + alpha * step
                norm = delta.norm(dim=-1, keepdim=True)
                delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0) * mask
        with torch.no_grad():
            logits = model(inputs_embeds=base + delta, attention_mask=b["attention_mask"]).logits
            correct += (logits.argmax(-1) == b["labels"]).sum().item()
            total += b["labels"].numel()
    model.train()
    return correct / max(total, 1)
