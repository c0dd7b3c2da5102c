"""Which module or weight a method perturbs when ``adversarial_kwargs`` does not say
(docs/hf.md, "Embeddings"): the input-embedding weight for fgm/fgsm/pgd, with the tied/frozen
checks, and the embedding block whose output SMART perturbs."""
from __future__ import annotations

import torch
from torch import nn

from fused_adv.methods._common import embedding_like_parameters


def _candidates(model: nn.Module) -> str:
    return ", ".join(embedding_like_parameters(model)[:12]) or "(none)"


def resolve_input_embedding(model: nn.Module, unwrapped: nn.Module, emb_name: str | None, method: str,
                            tied_embeddings: str = "error", frozen_embeddings: str = "error"):
    """The input-embedding weight(s) a weight-space method perturbs.

    ``model`` is the (possibly DDP-wrapped) model the fused class is built on, ``unwrapped`` the
    same without wrapper.  Without ``emb_name`` the weight of ``unwrapped.get_input_embeddings()``
    is found by identity among ``model.named_parameters()``.  Returns ``(emb_name, targets,
    frozen)``: the substring the fused class selects by, the selected parameters, and those of them
    to switch ``requires_grad`` on for a step (``frozen_embeddings="unfreeze"``; else empty).
    Mutates nothing.  Raises ValueError when no weight is found or the name is ambiguous, when
    every match is frozen (unless ``frozen_embeddings="unfreeze"``), or when a target is tied to
    another parameter (unless ``tied_embeddings="shared"``).
    """
    named = list(model.named_parameters())
    if emb_name is None:
        try:
            emb = unwrapped.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            emb = None
        weight = getattr(emb, "weight", None)
        name = next((n for n, p in named if p is weight), None) if isinstance(weight, torch.Tensor) else None
        if name is None:
            raise ValueError(
                f"{type(unwrapped).__name__}.get_input_embeddings() gives no weight among the model's "
                f"parameters; pass adversarial_kwargs={{'emb_name': ...}} (a substring of the embedding's "
                f"name). Embedding-like parameters: {_candidates(model)}")
        clashes = [n for n, _ in named if name in n and n != name]
        if clashes:
            raise ValueError(f"the input embedding's name {name!r} is also a substring of {clashes}: the "
                             "fused classes select by substring; pass an unambiguous emb_name")
        emb_name = name
    matched = [(n, p) for n, p in named if emb_name in n]
    if not matched:
        raise ValueError(
            f"emb_name={emb_name!r} matches no parameter of {type(model).__name__}, so the attack would "
            f"silently do nothing. Embedding-like parameters: {_candidates(model)}")
    targets = [p for _, p in matched if p.requires_grad]
    frozen = []
    if not targets:
        if frozen_embeddings != "unfreeze":
            raise ValueError(
                f"The embedding weight(s) {[n for n, _ in matched]} are frozen (requires_grad=False), as in "
                f"PEFT/LoRA models: they get no gradient, so {method.upper()} has no direction (the "
                f"community classes silently do nothing). Either make the embedding trainable (PEFT: "
                f"modules_to_save=['embed_tokens'/'word_embeddings']), pass adversarial_kwargs="
                f"{{'frozen_embeddings': 'unfreeze'}} to compute its gradient during the step only (it is "
                f"never updated), use an activation-space method (adversarial='freelb' | 'smart' | 'sift': "
                f"they perturb the embedding OUTPUT and need no embedding gradient), or adversarial='awp' "
                f"on the trainable (adapter) weights.")
        targets = frozen = [p for _, p in matched]
    all_named = list(model.named_parameters(remove_duplicate=False))
    for t in targets:
        own = [n for n, p in matched if p is t]
        # tied: the same Parameter under another name, or another Parameter viewing the same memory
        tied = [n for n, p in all_named
                if (p is t and n not in own)
                or (p is not t and p.shape == t.shape and p.device == t.device and p.device.type != "meta"
                    and p.numel() > 0 and p.data_ptr() == t.data_ptr())]   # FSDP1: empty pieces share addresses
        if tied and tied_embeddings != "shared":
            raise ValueError(
                f"The embedding weight {own} is tied to {tied} (tie_word_embeddings): {method.upper()} "
                f"would perturb that output projection too, which the community classes do silently. Pass "
                f"adversarial_kwargs={{'tied_embeddings': 'shared'}} to accept it (community behaviour), or "
                f"untie the weights (config.tie_word_embeddings=False before loading).")
    return emb_name, targets, frozen


def embedding_block(unwrapped: nn.Module) -> nn.Module:
    """SMART's perturbed module (the embedding block, whose output is after LayerNorm/dropout):
    ``base_model.embeddings``, looking through a PEFT wrapper.  Raises ValueError if there is none."""
    inner = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    base = getattr(inner, "base_model", inner)
    emb = getattr(base, "embeddings", None)
    if not isinstance(emb, nn.Module):
        raise ValueError(f"SMART: {type(inner).__name__} has no base_model.embeddings module; pass "
                         f"adversarial_kwargs={{'embedding_module': <the module whose output to perturb>}}")
    return emb
