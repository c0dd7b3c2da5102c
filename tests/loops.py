"""One training step per method, written once and driven with either the reference classes or
the fused ones, so both run exactly the same loop (docs/methods.md usage blocks)."""
from __future__ import annotations

import torch

import fused_adv
from fused_adv import reference

METHODS = ("fgm", "fgsm", "pgd", "awp")
PGD_K = 3


def loss_of(model, data):
    ids, mask, labels = data
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return (out.loss if hasattr(out, "loss") else out[0]).float()


def make_adversary(method: str, model, optimizer, *, fused: bool, backend: str = "auto", **kw):
    mod = fused_adv if fused else reference
    extra = {"backend": backend, "restore_mode": kw.get("restore_mode", "copy")} if fused else {}
    if method == "fgm":
        return mod.FGM(model, kw.get("emb_name", "word_embeddings"), kw.get("epsilon", 0.5), **extra)
    if method == "fgsm":
        return mod.FGSM(model, epsilon=kw.get("epsilon", 0.01), **extra)
    if method == "pgd":
        return mod.PGD(model, epsilon=kw.get("epsilon", 0.6), alpha=kw.get("alpha", 0.3), **extra)
    if method == "awp":
        return mod.AWP(model, optimizer, adv_lr=kw.get("adv_lr", 0.5), adv_eps=kw.get("adv_eps", 0.01),
                       adv_step=kw.get("adv_step", 2), autocast=False, **extra)
    raise ValueError(method)


def train_step(method: str, model, optimizer, adversary, data) -> float:
    """One full step (clean pass, adversarial pass(es), restore, optimizer step)."""
    if method == "awp":
        optimizer.zero_grad()
        loss = loss_of(model, data)
        loss.backward()
        adversary.attack_backward(closure=lambda: loss_of(model, data), epoch=0)
        optimizer.step()
        return loss.item()
    loss = loss_of(model, data)
    loss.backward()
    if method in ("fgm", "fgsm"):
        adversary.attack()
        loss_of(model, data).backward()
        adversary.restore()
    else:
        adversary.backup_grad()
        for t in range(PGD_K):
            adversary.attack(is_first_attack=(t == 0))
            if t != PGD_K - 1:
                model.zero_grad()
            else:
                adversary.restore_grad()
            loss_of(model, data).backward()
        adversary.restore()
    optimizer.step()
    model.zero_grad()
    return loss.item()
