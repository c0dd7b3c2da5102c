"""Helpers used by BOTH the reference (oracle) classes in fused_adv.reference and the fused drop-ins.

Why this module exists: the fused classes are checked by running them next to the reference
classes and comparing numbers.  Code that both of them call cannot be caught by that comparison
(an error in it shows up on both sides), so every such helper lives here, once, and is pinned
on its own by tests/test_shared_helpers.py on small float64 cases worked out by hand.  Neither
side may inherit behaviour from the other: a fused class imports from here, never from
fused_adv.reference.

What is here (and what deliberately is NOT: each method's update math, which the fused side
computes with fused_adv.ops and the reference side in plain torch, so the comparison checks it):

* AWP (docs/methods.md §4 (AWP (Kaggle))): :func:`awp_model_loss`, :func:`awp_autocast`,
  :func:`awp_adversarial_pass` — the adversarial forward/backward of the Kaggle class;
* FreeLB (§6 (FreeLB)): :func:`lookup_embeddings`, :func:`freelb_init_delta`;
* SMART (§7 (SMART)): :func:`stable_kl`, :func:`sym_kl_batchmean`, :func:`embedding_module_of`,
  :func:`embedding_output`, :func:`logits_with_embedding`;
* SiFT (§5 (SiFT)): :func:`symmetric_kl`, :func:`kl`, :func:`mse`, :data:`perturbation_loss_fns`;
* FreeAT and YOPO (§8 (FreeAT and YOPO)): :func:`check_steps`, :func:`first_layer_of`,
  :func:`hidden_of`, :func:`capture_output_grad`.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["awp_model_loss", "awp_autocast", "awp_adversarial_pass",
           "FREELB_NORM_TYPES", "check_freelb_norm_type", "lookup_embeddings", "freelb_init_delta",
           "stable_kl", "sym_kl_batchmean", "embedding_module_of", "embedding_output", "logits_with_embedding",
           "symmetric_kl", "kl", "mse", "perturbation_loss_fns",
           "check_steps", "FIRST_LAYER_PATHS", "first_layer_of", "hidden_of", "capture_output_grad"]


# ---------------------------------------------------------------------------------------- AWP
def awp_model_loss(model, x, y, attention_mask) -> torch.Tensor:
    """The Kaggle class's call convention: ``model(input_ids=x, attention_mask=attention_mask,
    labels=y)``; the loss is the output's ``.loss`` or, without one, its first element, averaged
    (``.mean()``, so a per-sample loss [B] becomes a 0-dim tensor in the loss's dtype).

    ``x``, ``attention_mask``: [B, L] token ids / mask; ``y``: the labels.  Mutates nothing;
    raises whatever the model's forward raises."""
    out = model(input_ids=x, attention_mask=attention_mask, labels=y)
    loss = out.loss if hasattr(out, "loss") else out[0]
    return loss.mean()


def awp_autocast(enabled: bool | None):
    """The context the Kaggle class runs its adversarial forward in: CUDA autocast (a no-op for
    CPU ops).  ``enabled=None``: on exactly when CUDA is available; ``True``/``False``: as asked.
    Returns a context manager; raises nothing."""
    if enabled is None:
        enabled = torch.cuda.is_available()
    return torch.autocast(device_type="cuda", enabled=True) if enabled else contextlib.nullcontext()


def awp_adversarial_pass(model, optimizer, *, x=None, y=None, attention_mask=None,
                         closure: Callable[[], torch.Tensor] | None = None,
                         backward: Callable[[torch.Tensor], None] | None = None,
                         scaler=None, autocast: bool | None = None) -> torch.Tensor:
    """One adversarial pass of the Kaggle AWP class, on the already perturbed weights:

    1. the loss: ``closure()`` when given, else :func:`awp_model_loss` ``(model, x, y,
       attention_mask)``, under :func:`awp_autocast` ``(autocast)``;
    2. ``optimizer.zero_grad()``: the gradients present (the clean ones) are DISCARDED, as in the
       Kaggle class, so the optimizer step uses only the adversarial gradient;
    3. the backward: ``backward(loss)`` when given, else ``scaler.scale(loss).backward()`` when a
       ``scaler`` is given, else ``loss.backward()``.

    Returns the adversarial loss (not detached; 0-dim for the Kaggle convention).  Mutates the
    parameters' ``.grad`` (zeroed, then the adversarial gradient).  Raises whatever the closure,
    forward or backward raise (nothing is restored here: the caller restores the weights)."""
    with awp_autocast(autocast):
        adv_loss = closure() if closure is not None else awp_model_loss(model, x, y, attention_mask)
    optimizer.zero_grad()
    if backward is not None:
        backward(adv_loss)
    elif scaler is not None:
        scaler.scale(adv_loss).backward()
    else:
        adv_loss.backward()
    return adv_loss


# ------------------------------------------------------------------------------------- FreeLB
FREELB_NORM_TYPES = ("l2", "linf")


def check_freelb_norm_type(adv_norm_type: str) -> str:
    """Returns ``adv_norm_type`` if it is 'l2' or 'linf'; raises ValueError otherwise."""
    if adv_norm_type not in FREELB_NORM_TYPES:
        raise ValueError(f"adv_norm_type must be 'l2' or 'linf', got {adv_norm_type!r}")
    return adv_norm_type


def lookup_embeddings(model, embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """The word embeddings of ``input_ids`` [B, L]: ``embedding(input_ids)``, or, when
    ``embedding`` is None, ``model.get_input_embeddings()(input_ids)``.  Returns [B, L, E] in the
    embedding weight's dtype, with its graph to the weight (FreeLB looks them up again after
    every ascent step so every adversarial loss reaches them).  Raises AttributeError when
    ``embedding`` is None and the model has no ``get_input_embeddings``."""
    emb = embedding if embedding is not None else model.get_input_embeddings()
    return emb(input_ids)


def freelb_init_delta(embeds_init: torch.Tensor, attention_mask: torch.Tensor, adv_init_mag: float,
                      adv_norm_type: str) -> torch.Tensor:
    """FreeLB's initial perturbation, as the official example draws it (docs/methods.md §6 (FreeLB)).

    ``embeds_init``: [B, L, E] word embeddings (any float dtype); ``attention_mask``: [B, L]
    (0/1, any dtype).  Returns a new tensor [B, L, E] in ``embeds_init``'s dtype, not requiring
    grad:

    * ``adv_init_mag <= 0``: zeros (no random numbers drawn);
    * 'l2': ``U(-1, 1) * mask * adv_init_mag / sqrt(len_b * E)`` per sample b (len_b = number of
      unmasked tokens; a sample with len_b = 0 gets 0 * inf = NaN, as in the original);
    * 'linf': ``U(-adv_init_mag, adv_init_mag) * mask``.

    The random numbers come from ONE ``uniform_`` over the full [B, L, E] shape, so a seeded run
    reproduces the original's delta.  Mutates nothing it is given; raises ValueError for an
    unknown ``adv_norm_type`` when adv_init_mag > 0."""
    if adv_init_mag <= 0:
        return torch.zeros_like(embeds_init)
    check_freelb_norm_type(adv_norm_type)
    input_mask = attention_mask.to(embeds_init)
    input_lengths = torch.sum(input_mask, 1)
    if adv_norm_type == "l2":
        delta = torch.zeros_like(embeds_init).uniform_(-1, 1) * input_mask.unsqueeze(2)
        dims = input_lengths * embeds_init.size(-1)
        mag = adv_init_mag / torch.sqrt(dims)
        return (delta * mag.view(-1, 1, 1)).detach()
    delta = torch.zeros_like(embeds_init).uniform_(-adv_init_mag, adv_init_mag)
    return delta * input_mask.unsqueeze(2)


# -------------------------------------------------------------------------------------- SMART
def stable_kl(logit: torch.Tensor, target: torch.Tensor, epsilon: float = 1e-6, reduce: bool = True) -> torch.Tensor:
    """mt-dnn's numerically stable KL (the SMART ascent loss, docs/methods.md §7 (SMART)).

    ``logit``, ``target``: [..., C] (flattened to rows of C; computed in float32).  With
    p = softmax(logit), y = softmax(target) and ``r(q) = -log(1/(q + eps) - 1 + eps)`` (a logit of
    q, DETACHED), returns ``sum(2 p (r(p) - r(y)))`` divided by the number of rows when
    ``reduce`` (0-dim float32).  Gradient flows to ``logit`` through p only (and to ``target``
    not at all).  Mutates nothing."""
    logit = logit.view(-1, logit.size(-1)).float()
    target = target.view(-1, target.size(-1)).float()
    bs = logit.size(0)
    p = F.log_softmax(logit, 1).exp()
    y = F.log_softmax(target, 1).exp()
    rp = -(1.0 / (p + epsilon) - 1 + epsilon).detach().log()
    ry = -(1.0 / (y + epsilon) - 1 + epsilon).detach().log()
    if reduce:
        return (p * (rp - ry) * 2).sum() / bs
    return (p * (rp - ry) * 2).sum()


def sym_kl_batchmean(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mt-dnn's SymKlCriterion (alpha 1), the SMART regulariser: ``KL(softmax(target).detach() ||
    softmax(input)) + KL(softmax(input).detach() || softmax(target))``, each summed over [..., C]
    and divided by the size of dim 0 (``reduction='batchmean'``); float32 0-dim.  Gradient reaches
    both ``input`` and ``target`` through their log-softmax.  Mutates nothing."""
    input = input.float()
    target = target.float()
    return (F.kl_div(F.log_softmax(input, dim=-1, dtype=torch.float32),
                     F.softmax(target.detach(), dim=-1, dtype=torch.float32), reduction="batchmean")
            + F.kl_div(F.log_softmax(target, dim=-1, dtype=torch.float32),
                       F.softmax(input.detach(), dim=-1, dtype=torch.float32), reduction="batchmean"))


class _StopForward(Exception):
    """Raised by a forward hook to end a forward early (caught by embedding_output)."""


def embedding_module_of(model):
    """The module whose output SMART perturbs: ``model.base_model.embeddings`` (HF models; a model
    without ``base_model`` is searched itself).  Raises ValueError when there is none."""
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if emb is None:
        raise ValueError("SMART: cannot find the embedding module (model.base_model.embeddings); "
                         "pass embedding_module=")
    return emb


def embedding_output(model, module, batch: dict):
    """Runs ``model(**batch)`` only up to ``module`` and returns that module's output (e.g. [B, L,
    H] after LayerNorm/dropout, with its graph to the embedding parameters; the rest of the model
    does not run).  Consumes the random numbers of the embedding module's dropout.  Leaves no hook
    behind; raises RuntimeError when the forward never reaches ``module``."""
    box = {}

    def hook(mod, args, out):
        box["out"] = out
        raise _StopForward

    h = module.register_forward_hook(hook)
    try:
        model(**batch)
    except _StopForward:
        pass
    finally:
        h.remove()
    if "out" not in box:
        raise RuntimeError(f"embedding_output: the forward of {type(model).__name__} did not run "
                           f"{type(module).__name__}; pass the module the model actually calls")
    return box["out"]


def logits_with_embedding(model, module, batch: dict, embed: torch.Tensor) -> torch.Tensor:
    """``model(**batch).logits`` with ``module``'s output replaced by ``embed`` (same shape as
    that output).  Leaves no hook behind; raises what the forward raises (AttributeError when the
    output has no ``.logits``)."""
    h = module.register_forward_hook(lambda mod, args, out: embed)
    try:
        return model(**batch).logits
    finally:
        h.remove()


# --------------------------------------------------------------------------------------- SiFT
def symmetric_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DeBERTa's SiFT loss, per row of C logits (docs/methods.md §5 (SiFT)).

    ``logits``, ``target``: [..., C], flattened to [N, C] and computed in float32.  Returns [N]:
    ``CE(p_t, log p_s) + CE(p_s, log p_t)`` = ``sum_c p_t (-log p_s) + p_s (-log p_t)`` with both
    probabilities detached, so the gradient w.r.t. ``logits`` is ``p_s - p_t`` and w.r.t.
    ``target`` is ``p_t - p_s``.  Mutates nothing."""
    logit_stu = logits.view(-1, logits.size(-1)).float()
    logit_tea = target.view(-1, target.size(-1)).float()
    logprob_stu = F.log_softmax(logit_stu, -1)
    logprob_tea = F.log_softmax(logit_tea, -1)
    prob_tea = logprob_tea.exp().detach()
    prob_stu = logprob_stu.exp().detach()
    floss = (prob_tea * (-logprob_stu)).sum(-1)
    bloss = (prob_stu * (-logprob_tea)).sum(-1)
    return floss + bloss


def kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DeBERTa's 'kl' SiFT loss: per row [N] (float32) of ``CE(softmax(target).detach(),
    log_softmax(logits))`` = ``sum_c p_t (-log p_s)`` (a cross-entropy: KL up to the constant
    entropy of p_t).  ``logits``, ``target``: [..., C].  Mutates nothing."""
    logit_stu = logits.view(-1, logits.size(-1)).float()
    logit_tea = target.view(-1, target.size(-1)).float()
    logprob_stu = F.log_softmax(logit_stu, -1)
    logprob_tea = F.log_softmax(logit_tea.detach(), -1)
    prob_tea = logprob_tea.exp()
    return (prob_tea * (-logprob_stu)).sum(-1)


def mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DeBERTa's 'mse' SiFT loss: the mean over ALL elements of (logits - target)^2, float32
    0-dim (target not detached).  ``logits``, ``target``: [..., C] with the same number of
    elements.  Mutates nothing."""
    logit_stu = logits.view(-1, logits.size(-1)).float()
    logit_tea = target.view(-1, target.size(-1)).float()
    return F.mse_loss(logit_stu.view(-1), logit_tea.view(-1))


perturbation_loss_fns = {"symmetric-kl": symmetric_kl, "kl": kl, "mse": mse}


# ------------------------------------------------------------------------------ FreeAT / YOPO
def check_steps(what: str, n) -> int:
    """``int(n)`` when it is an integer >= 1; raises ValueError naming ``what`` otherwise (a step
    count of 0 would silently train without the attack)."""
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {n!r}")
    return int(n)


# Where HF models keep their stack of transformer blocks, relative to ``model.base_model``:
# BERT / RoBERTa / DeBERTa / ELECTRA / XLM-R (encoder.layer), DistilBERT (transformer.layer),
# Llama / Mistral / Qwen (layers), GPT-2 (h), BART-like encoders (encoder.layers).
FIRST_LAYER_PATHS = ("encoder.layer", "transformer.layer", "layers", "h", "encoder.layers")


def first_layer_of(model, first_layer=None):
    """YOPO's "first layer" (docs/methods.md §8 (FreeAT and YOPO)): the module whose output the
    co-state p is taken at.

    ``first_layer``: a module (returned as is), a qualified name in ``model.named_modules()``
    (e.g. ``"bert.encoder.layer.0"``), or None: block 0 of the first of :data:`FIRST_LAYER_PATHS`
    found under ``model.base_model`` (the model itself when it has no ``base_model``).  With
    ``inputs_embeds = embeds + delta`` the model's embedding module (positions, token types,
    LayerNorm, dropout) runs before that block, so its output is what fairseq's
    ``Hamiltonian_fwd`` computes as the first layer.  Mutates nothing.  Raises ValueError for a
    name that is not a submodule (listing a few that are) or when no default is found."""
    if isinstance(first_layer, torch.nn.Module):
        return first_layer
    if isinstance(first_layer, str):
        modules = dict(model.named_modules())
        if first_layer not in modules or first_layer == "":
            near = [n for n in modules if n.endswith(".0") or n.endswith("layer.0")][:8]
            raise ValueError(f"first_layer={first_layer!r} is not a submodule of {type(model).__name__}; "
                             f"e.g. {near or list(modules)[1:9]}")
        return modules[first_layer]
    if first_layer is not None:
        raise TypeError(f"first_layer must be a module, a module name or None, got {type(first_layer).__name__}")
    base = getattr(model, "base_model", model)
    for path in FIRST_LAYER_PATHS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, (torch.nn.ModuleList, torch.nn.Sequential)) and len(obj) > 0:
            return obj[0]
    raise ValueError(f"cannot find the first transformer block of {type(model).__name__} (looked for "
                     f"base_model.{{{', '.join(FIRST_LAYER_PATHS)}}}[0]); pass first_layer= a module or its name")


def hidden_of(output) -> torch.Tensor:
    """The hidden states in a block's output: the output itself when it is a tensor, else its
    first element (HF blocks of older versions return tuples).  Raises TypeError otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the first layer returned {type(output).__name__}; expected a tensor or a tuple "
                    f"starting with one")


@contextlib.contextmanager
def capture_output_grad(module, box: dict):
    """While the block runs: every forward of ``module`` registers a hook on its hidden output
    (:func:`hidden_of`) that stores the gradient reaching it in ``box["grad"]`` (the LAST
    forward's gradient is what the next backward leaves there; detached, the output's shape and
    dtype).  YOPO's co-state p = dL/d(first-layer output).  The forward hook is removed on exit,
    also when the block raises.  Yields ``box``."""
    def hook(mod, args, out):
        h = hidden_of(out)
        if h.requires_grad:
            h.register_hook(lambda g: box.__setitem__("grad", g.detach()))

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
