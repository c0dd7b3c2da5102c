"""The training recipes the demo compares: one plain loop and one loop per adversarial method,
each written exactly as that method's original code drives it, run once with the community /
original class (``fused_adv.reference``) and once with the fused drop-in (``fused_adv``).

Settings (defaults of the ``fused-adv demo`` flags) and where they come from, for
all-MiniLM-L6-v2 (6 layers, hidden 384) fine-tuned on short sentences:

* optimiser: AdamW, weight decay 0.01, linear warmup over the first 10% of the steps then linear
  decay to 0, gradient norm clipped at 1.0: the Hugging Face fine-tuning recipe (Trainer
  defaults, ``get_linear_schedule_with_warmup``).  Peak lr 1e-4 for the encoder: the upper end of
  the usual 2e-5..1e-4 range, because a 6-layer model and a budget of a few dozen steps want the
  high end; the new classification head at lr 1e-3 (a separate head lr, as Kaggle solutions set
  it), on the mean-pooled token states (fused_adv/demo/data.py: the pooling all-MiniLM-L6-v2 was
  trained with).  The demo this replaces ([CLS] pooler, lr 5e-5 constant, AWP adv_lr 1.0, 30
  steps) ended with FGM and AWP at 50% and 45%, i.e. nothing learned.
* FGM: epsilon 1.0 on ``word_embeddings`` (the value the community class ships with, which
  notebooks use unchanged).
* PGD: epsilon 1.0, alpha 0.3, K = 3 on ``word_embeddings`` (the community class's defaults).
* MI-FGSM: epsilon 1.0, 3 steps, decay 1.0 (docs/methods.md §2b (MI-FGSM)).
* AWP (Kaggle class): adv_lr 1e-3, adv_eps 1e-2 on every ``weight``, switched on after the first
  quarter of the steps: the range public Kaggle Feedback Prize AWP solutions use (adv_lr 1e-4..1e-3,
  adv_eps 1e-2, AWP started once the model has learned something).  The class default
  adv_lr = 1.0 moves every weight to the edge of its box on every step (the earlier demo ran it
  and ended at 45% accuracy).
* FreeLB: K = 2 ascent steps, adv_lr 0.1, adv_init_mag 0.02, no projection (adv_max_norm 0): the
  official HF example's defaults (zhuchen03/FreeLB ``run_glue_freelb.py``); K = 2, the low end of
  the paper's few ascent steps, to keep FreeLB's cost (K passes per step) within the budget.
* SMART: adv_alpha 1.0, noise_var 1e-5, step_size 1e-3, epsilon 1e-6, K = 1 (mt-dnn's defaults).
* SiFT: ``hook_sift_layer`` on ``embeddings.LayerNorm`` (lr 1e-4, init 1e-2), vat_lambda 3: the
  DeBERTa-v3-xsmall SiFT recipe of microsoft/DeBERTa.
* SAM: rho 0.05 around AdamW (davda54/sam's default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

#: the methods the demo knows, in table order; each runs as "<method>-reference" and "<method>-fused"
METHODS = ("fgm", "awp", "freelb", "pgd", "mifgsm", "smart", "sift", "sam")
DEFAULT_METHODS = ("fgm", "awp", "freelb")
IMPLS = ("reference", "fused")


def all_runs() -> list[str]:
    """Every run name: "plain" and "<method>-<impl>" for each method and implementation."""
    return ["plain"] + [f"{m}-{i}" for m in METHODS for i in IMPLS]


def default_runs() -> list[str]:
    """plain vs FGM vs AWP vs FreeLB, reference and fused."""
    return ["plain"] + [f"{m}-{i}" for m in DEFAULT_METHODS for i in IMPLS]


def parse_run(run: str) -> tuple[str, str | None]:
    """'plain' -> ('plain', None); 'fgm-fused' -> ('fgm', 'fused').  Raises ValueError otherwise."""
    if run == "plain":
        return "plain", None
    method, _, impl = run.partition("-")
    if method not in METHODS or impl not in IMPLS:
        raise ValueError(f"unknown run {run!r}; choose from {', '.join(all_runs())}")
    return method, impl


def settings(args) -> dict:
    """The hyper-parameters each method runs with (as recorded in demo.json / demo.md)."""
    return {
        "fgm": {"epsilon": args.fgm_eps, "emb_name": "word_embeddings"},
        "pgd": {"epsilon": args.pgd_eps, "alpha": args.pgd_alpha, "K": args.pgd_k, "emb_name": "word_embeddings"},
        "mifgsm": {"epsilon": args.pgd_eps, "steps": args.pgd_k, "decay": 1.0, "emb_name": "word_embeddings"},
        "awp": {"adv_lr": args.awp_lr, "adv_eps": args.awp_eps, "adv_param": "weight", "start_step": args.awp_start},
        "freelb": {"adv_K": args.freelb_k, "adv_lr": args.freelb_lr, "adv_init_mag": args.freelb_init_mag,
                   "adv_max_norm": 0.0},
        "smart": {"adv_alpha": args.smart_alpha, "noise_var": 1e-5, "step_size": 1e-3, "epsilon": 1e-6, "adv_K": 1},
        "sift": {"vat_lambda": args.sift_lambda, "learning_rate": 1e-4, "init_perturbation": 1e-2,
                 "target_module": "embeddings.LayerNorm"},
        "sam": {"rho": args.sam_rho},
    }


@dataclass
class Trainer:
    """One run's optimiser, schedule and adversary, and its ``step(batch, i)``."""
    run: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    adversary: object = None
    step_fn: Callable = None
    active_from: int = 0          # first step at which the adversary is used (AWP starts late)
    extra: dict = field(default_factory=dict)

    def step(self, batch: dict, i: int) -> float:
        """One training step on ``batch`` (step index ``i``); returns the loss the recipe reports
        (the clean loss; FreeLB: the mean of its K adversarial losses, it has no clean pass)."""
        loss = self.step_fn(self, batch, i)
        self.scheduler.step()
        return loss

    def held_bytes(self):
        """Bytes the fused adversary keeps between steps (None when it does not say)."""
        f = getattr(self.adversary, "extra_memory_bytes", None)
        return f() if callable(f) else None


def _schedule(optimizer, steps: int, warmup: int):
    """Linear warmup over ``warmup`` steps then linear decay to 0 at ``steps`` (HF's
    ``get_linear_schedule_with_warmup``, restated to avoid importing transformers.optimization)."""
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        return max(0.0, (steps - i) / max(1, steps - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _clip(model, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _finish(tr: Trainer) -> None:
    _clip(tr.model, tr.extra["clip"])
    tr.optimizer.step()
    tr.optimizer.zero_grad()


# --- one step per recipe, as each original loop writes it -------------------------------------
def _plain(tr, batch, i):
    loss = tr.model(**batch).loss
    loss.backward()
    _finish(tr)
    return loss.item()


def _fgm(tr, batch, i):
    loss = tr.model(**batch).loss
    loss.backward()
    tr.adversary.attack()                      # grads accumulate: clean + adversarial
    tr.model(**batch).loss.backward()
    tr.adversary.restore()
    _finish(tr)
    return loss.item()


def _pgd(tr, batch, i):
    adv, k = tr.adversary, tr.extra["K"]
    loss = tr.model(**batch).loss
    loss.backward()
    adv.backup_grad()
    for t in range(k):
        adv.attack(is_first_attack=(t == 0))
        if t != k - 1:
            tr.model.zero_grad()
        else:
            adv.restore_grad()
        tr.model(**batch).loss.backward()
    adv.restore()
    _finish(tr)
    return loss.item()


def _awp(tr, batch, i):
    # Kaggle Feedback Prize loop: clean backward, then attack_backward replaces the grads by the
    # adversarial gradient taken at the perturbed weights (from step start_epoch on; "epoch" is
    # the step index here).
    loss = tr.model(**batch).loss
    tr.optimizer.zero_grad()
    loss.backward()
    tr.adversary.attack_backward(batch["input_ids"], batch["labels"], batch["attention_mask"], i)
    _finish(tr)
    return loss.item()


def _freelb(tr, batch, i):
    loss = tr.adversary.attack(tr.model, batch)   # K forward/backward passes, grads accumulate
    _finish(tr)
    return float(loss)


def _smart(tr, batch, i):
    out = tr.model(**batch)
    total = out.loss + tr.adversary.loss(tr.model, batch, out.logits)
    total.backward()
    _finish(tr)
    return out.loss.item()


def _logits_fn(model, **kw):
    return model(**kw).logits


def _sift(tr, batch, i):
    out = tr.model(**batch)                       # the clean forward stores x̂ in the hooked layer
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    total = out.loss + tr.adversary.loss(out.logits, _logits_fn, **inputs) * tr.extra["vat_lambda"]
    total.backward()
    _finish(tr)
    return out.loss.item()


def _sam(tr, batch, i):
    opt = tr.optimizer
    loss = tr.model(**batch).loss
    loss.backward()
    opt.first_step(zero_grad=True)
    tr.model(**batch).loss.backward()             # the gradient at w + e(w)
    _clip(tr.model, tr.extra["clip"])             # clips the gradient the base optimizer uses
    opt.second_step(zero_grad=True)
    return loss.item()


def build(run: str, model, args) -> Trainer:
    """The :class:`Trainer` of ``run`` on ``model`` (fresh optimiser, schedule and adversary).
    ``args`` carries the flags of ``fused-adv demo``.  Raises ValueError for an unknown run."""
    import fused_adv
    from fused_adv import reference

    method, impl = parse_run(run)
    fused = impl == "fused"
    be = {"backend": args.backend} if fused else {}
    warmup = max(1, round(args.warmup * args.steps))
    opt_kw = dict(lr=args.lr, weight_decay=args.weight_decay)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    groups = [{"params": body}, {"params": head, "lr": args.head_lr}]   # the new head learns faster
    if method == "sam":
        cls = fused_adv.SAM if fused else reference.SAM
        optimizer = cls(groups, torch.optim.AdamW, rho=args.sam_rho, **be, **opt_kw)
    else:
        optimizer = torch.optim.AdamW(groups, **opt_kw)
    # SAM shares its param groups with the base optimizer, whose step() second_step calls: the
    # schedule is attached to the base optimizer (same learning rates, no "step order" warning)
    scheduled = optimizer.base_optimizer if method == "sam" else optimizer
    tr = Trainer(run, model, optimizer, _schedule(scheduled, args.steps, warmup), extra={"clip": args.clip})
    mod = fused_adv if fused else reference
    if method == "plain":
        tr.step_fn = _plain
    elif method == "fgm":
        tr.adversary, tr.step_fn = mod.FGM(model, emb_name="word_embeddings", epsilon=args.fgm_eps, **be), _fgm
    elif method == "pgd":
        tr.adversary = mod.PGD(model, epsilon=args.pgd_eps, alpha=args.pgd_alpha, emb_name="word_embeddings", **be)
        tr.step_fn, tr.extra["K"] = _pgd, args.pgd_k
    elif method == "mifgsm":
        tr.adversary = mod.MIFGSM(model, epsilon=args.pgd_eps, steps=args.pgd_k, decay=1.0,
                                  emb_name="word_embeddings", **be)
        tr.step_fn, tr.extra["K"] = _pgd, args.pgd_k
    elif method == "awp":
        tr.adversary = mod.AWP(model, optimizer, adv_param="weight", adv_lr=args.awp_lr, adv_eps=args.awp_eps,
                               start_epoch=args.awp_start, **be)
        tr.step_fn, tr.active_from = _awp, args.awp_start
    elif method == "freelb":
        tr.adversary = mod.FreeLB(adv_K=args.freelb_k, adv_lr=args.freelb_lr, adv_init_mag=args.freelb_init_mag,
                                  adv_max_norm=0.0, **be)
        tr.step_fn = _freelb
    elif method == "smart":
        tr.adversary = mod.SMART(adv_alpha=args.smart_alpha, **be)
        tr.step_fn = _smart
    elif method == "sift":
        sift = fused_adv.sift if fused else reference.sift
        layers = sift.hook_sift_layer(model, hidden_size=model.config.hidden_size, **be)
        tr.adversary = sift.AdversarialLearner(model, layers)
        tr.step_fn, tr.extra["vat_lambda"] = _sift, args.sift_lambda
    elif method == "sam":
        tr.adversary, tr.step_fn = optimizer, _sam
    return tr
