"""FreeAT for Hugging Face models in a plain training loop (docs/hf.md, "freeat: a plain loop";
docs/methods.md §8 (FreeAT and YOPO)).

Why not ``adversarial="freeat"`` in the Trainer: FreeAT takes one OPTIMIZER STEP PER REPLAY of a
batch (m replays, the noise carried between them and, for the original rule, across batches).
In the Trainer one ``training_step`` is one micro-batch of one optimizer step, and the batches come
from the Trainer's own sampler and dataloader; replaying each batch m times as m Trainer steps
needs the data pipeline to repeat every batch (or every group of ``gradient_accumulation_steps``
micro-batches) m times in a row -- a sampler the Trainer builds itself (and reshuffles, shards
and skips on resume), which a strategy cannot own -- and running the m optimizer steps inside one
``training_step`` would hide them from the Trainer's step count, LR schedule, gradient clipping,
GradScaler and logging.  So FreeAT comes as this loop, where every replay is visibly one step.

    from fused_adv import FreeAT
    from fused_adv.integrations.hf.freeat_loop import train_freeat

    freeat = FreeAT(model, adv_steps=4, adv_lr=1e-2, adv_max_norm=3e-2)          # 'sign' rule
    losses = train_freeat(model, loader, optimizer, freeat, scheduler=sched, max_grad_norm=1.0)
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["train_freeat", "SCHEDULER_PER"]

SCHEDULER_PER = ("batch", "replay")


def _to(batch, device):
    if device is None:
        return batch
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_freeat(model, dataloader, optimizer, freeat, *, epochs: int = 1, scheduler=None,
                 scheduler_per: str = "batch", max_grad_norm: float | None = None, device=None,
                 callback=None) -> torch.Tensor:
    """``epochs`` passes over ``dataloader`` with FreeAT: for every batch, ``freeat.adv_steps``
    times ``optimizer.zero_grad()``, ``freeat.replay(model, batch, j)`` (one forward/backward on
    the perturbed embeddings and the noise update), gradient clipping to ``max_grad_norm`` (when
    given, ``torch.nn.utils.clip_grad_norm_`` over ``model.parameters()``), ``optimizer.step()``.

    ``freeat``: a ``fused_adv.FreeAT`` (or ``fused_adv.reference.FreeAT``).  ``scheduler``:
    stepped once per batch (``scheduler_per='batch'``: the FreeLB repo's NLP schedule counts one
    update per batch) or once per replay (``'replay'``: every optimizer step).  The original FreeAT
    divides the epochs by m (``ceil(epochs / n_repeats)``): pass the divided number.  ``device``:
    batches (dicts of tensors) are moved there.  ``callback(step, j, loss)``: called after every
    optimizer step (``step`` counts optimizer steps from 0; ``loss`` a detached device tensor).

    Puts ``model`` in train mode.  Returns every replay's loss (float32 tensor [steps], one host
    read at the end; none during training).  Raises ValueError for ``epochs < 1``, a bad
    ``scheduler_per`` or a batch that is not a dict, and what ``freeat.replay`` raises (the noise
    is then not updated and no optimizer step is taken for that replay)."""
    if int(epochs) < 1:
        raise ValueError(f"train_freeat: epochs must be >= 1, got {epochs}")
    if scheduler_per not in SCHEDULER_PER:
        raise ValueError(f"train_freeat: scheduler_per must be one of {SCHEDULER_PER}, got {scheduler_per!r}")
    model.train()
    losses, step = [], 0
    for _ in range(int(epochs)):
        for batch in dataloader:
            if not isinstance(batch, Mapping):
                raise ValueError(f"train_freeat: batches must be dicts of model kwargs, got {type(batch).__name__}")
            batch = _to(dict(batch), device)
            for j in range(freeat.adv_steps):
                optimizer.zero_grad()
                loss = freeat.replay(model, batch, j)
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                if scheduler is not None and scheduler_per == "replay":
                    scheduler.step()
                losses.append(loss.float())
                if callback is not None:
                    callback(step, j, loss)
                step += 1
            if scheduler is not None and scheduler_per == "batch":
                scheduler.step()
    return torch.stack(losses).cpu() if losses else torch.empty(0)
