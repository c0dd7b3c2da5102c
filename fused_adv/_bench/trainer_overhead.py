"""Where an HF Trainer step with fused AWP spends its time, against the plain Trainer step
(docs/design.md §7 (Targets): at most the extra forward/backward plus 5%).

``python -m fused_adv._bench.trainer_overhead [--steps 12] [--rounds 2] [--batch 16] [--seq 64]``

A randomly initialised BERT (no download; default: the tiny BERT of docs/design.md §1 (Users),
4 layers x 256, vocabulary 30522) is trained by two Trainers from the same weights: a plain one
and one with ``adversarial="awp"``.  Rounds alternate between them (machine noise hits both);
the first step of each round is dropped.  Inside the AWP step, the parts are timed by wrapping
their functions at class level:

* ``clean``        the Trainer's own step on the batch (forward, backward, as in the plain step)
* ``adversarial``  the extra forward/backward on the perturbed weights
* ``attack_step``  AWP's perturbation (norms + one multi-tensor update; fused_adv.AWP)
* ``restore``      putting the weights back (one multi-tensor copy)
* ``zero_grad``    dropping the clean gradient before the adversarial backward
* ``other``        the rest of the AWP step (strategy bookkeeping, set-aside grads)

and the report is: plain step, AWP step, their difference, the adversarial pass, and what the
difference costs beyond the adversarial pass (the target: <= 5% of the plain step); and the same
from the AWP run alone (its clean pass and optimizer step are the plain step's), which machine
load that differs between the two runs does not skew.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch


class _Timers:
    """Seconds per (run kind, part), accumulated by wrapped functions while ``kind`` is set; a
    wrapper given ``only`` counts during that kind of run only (nested calls are not excluded:
    the parts are chosen so that they do not nest)."""

    def __init__(self):
        self.totals: dict[tuple[str, str], float] = defaultdict(float)
        self.kind: str | None = None

    def wrap(self, owner, name: str, label: str, only: str | None = None):
        original = owner.__dict__[name]
        timers = self

        def timed(*args, **kwargs):
            if timers.kind is None or (only is not None and timers.kind != only):
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.totals[(timers.kind, label)] += time.perf_counter() - t0

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


def _model(vocab: int, hidden: int, layers: int, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                     max_position_embeddings=512, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _data(n: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, vocab, (seq,), generator=g),
             "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(n)]


def measure(steps: int = 12, rounds: int = 2, batch: int = 16, seq: int = 64, vocab: int = 30522,
            hidden: int = 256, layers: int = 4, backend: str = "auto") -> dict:
    """Runs the comparison (module docstring); returns medians in ms and the per-step split."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import fused_adv
    from fused_adv.integrations.hf import AdversarialTrainerMixin
    from fused_adv.integrations.hf.passes import Passes
    from fused_adv.methods._common import Perturbation

    class AdvTrainer(AdversarialTrainerMixin, Trainer):
        pass

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    data = _data(batch * steps, seq, vocab)
    timers = _Timers()
    undo = [timers.wrap(fused_adv.AWP, "attack_step", "attack_step"),
            timers.wrap(Perturbation, "restore", "restore"),
            timers.wrap(Passes, "clean", "clean"),
            timers.wrap(Passes, "adversarial", "adversarial"),
            timers.wrap(torch.nn.Module, "zero_grad", "zero_grad"),
            timers.wrap(Trainer, "training_step", "training_step", only="plain"),
            timers.wrap(AdversarialTrainerMixin, "training_step", "training_step", only="awp")]
    results: dict[str, list[float]] = {"plain": [], "awp": []}
    totals = {"plain": 0.0, "awp": 0.0}
    try:
        with tempfile.TemporaryDirectory() as out:
            for _ in range(rounds):
                for kind in ("plain", "awp"):
                    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                                             optim="adamw_torch", learning_rate=1e-5, report_to=[],
                                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                             use_cpu=True, seed=0, dataloader_num_workers=0)
                    clock = StepClock()
                    kw = dict(model=_model(vocab, hidden, layers), args=args, train_dataset=data, callbacks=[clock])
                    if kind == "awp":
                        tr = AdvTrainer(adversarial="awp", adversarial_kwargs={"adv_lr": 1e-3, "adv_eps": 1e-3},
                                        adversarial_backend=backend, **kw)
                    else:
                        tr = Trainer(**kw)
                    timers.kind = kind
                    before = dict(timers.totals)
                    tr.train()
                    timers.kind = None
                    kept = clock.times[1:]
                    results[kind] += kept
                    # the first step's parts are dropped like its time: scale to the kept steps
                    share = sum(kept) / max(sum(clock.times), 1e-12)
                    for k in timers.totals:
                        if k[0] == kind:
                            timers.totals[k] = before.get(k, 0.0) + (timers.totals[k] - before.get(k, 0.0)) * share
                    totals[kind] += sum(kept)
    finally:
        for u in undo:
            u()
    out = {"steps": {k: len(v) for k, v in results.items()}}
    for kind in ("plain", "awp"):
        n = len(results[kind])
        parts = {label: v / n * 1e3 for (k, label), v in timers.totals.items() if k == kind}
        mean = totals[kind] / n * 1e3
        parts["outside_training_step"] = mean - parts.get("training_step", 0.0)  # optimizer step, loop
        if kind == "awp":
            parts["strategy_other"] = parts.get("training_step", 0.0) - sum(
                parts.get(k, 0.0) for k in ("clean", "adversarial", "attack_step", "restore"))
        out[kind] = {"median_ms": statistics.median(results[kind]) * 1e3, "mean_ms": mean, "parts_ms": parts}
    plain, awp = out["plain"]["mean_ms"], out["awp"]["mean_ms"]
    adv = out["awp"]["parts_ms"].get("adversarial", 0.0)
    out.update(extra_ms=awp - plain, beyond_adversarial_ms=awp - plain - adv,
               beyond_pct_of_plain=100 * (awp - plain - adv) / plain)
    # The same figure from the AWP run alone: its clean pass IS the plain training_step, and the
    # optimizer step and loop outside training_step are the plain step's too.  Runs of the two
    # Trainers a minute apart see different machine load (2-core CI machines, shared); parts of
    # one run do not.
    p = out["awp"]["parts_ms"]
    plain_within = p.get("clean", 0.0) + p["outside_training_step"]
    beyond_within = p.get("training_step", 0.0) - p.get("clean", 0.0) - adv
    out.update(within_plain_ms=plain_within, within_beyond_ms=beyond_within,
               within_beyond_pct=100 * beyond_within / max(plain_within, 1e-12))
    return out


def main(argv=None) -> None:
    """Parses ``argv``, runs :func:`measure`, prints the split."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = measure(a.steps, a.rounds, a.batch, a.seq, hidden=a.hidden, layers=a.layers, backend=a.backend)
    for kind in ("plain", "awp"):
        k = r[kind]
        print(f"{kind:5s} Trainer step: mean {k['mean_ms']:.1f} ms, median {k['median_ms']:.1f} ms "
              f"({r['steps'][kind]} steps)")
        for label in ("training_step", "clean", "adversarial", "attack_step", "restore", "zero_grad",
                      "strategy_other", "outside_training_step"):
            if label in k["parts_ms"]:
                print(f"    {label:22s} {k['parts_ms'][label]:8.2f} ms/step")
    print(f"AWP - plain: {r['extra_ms']:.1f} ms (means)")
    print(f"beyond the adversarial forward/backward: {r['beyond_adversarial_ms']:.1f} ms "
          f"= {r['beyond_pct_of_plain']:.1f}% of the plain step")
    p = r["awp"]["parts_ms"]
    print(f"within the AWP run (plain part = clean pass + outside training_step = {r['within_plain_ms']:.1f} ms): "
          f"beyond the adversarial forward/backward {r['within_beyond_ms']:.1f} ms = {r['within_beyond_pct']:.2f}% "
          f"(attack_step {p.get('attack_step', 0.0):.1f}, restore {p.get('restore', 0.0):.1f}, the rest of the "
          f"strategy and mixin, its zero_grad included, {p.get('strategy_other', 0.0):.1f} ms)")


if __name__ == "__main__":
    main()
