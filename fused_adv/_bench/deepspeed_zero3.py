"""Bookkeeping time and collectives per step under DeepSpeed ZeRO-3, 2 CPU ranks: the fused
classes given the engine vs the community workaround (docs/methods.md §12 (Sharded training)).

    python benchmarks/deepspeed_zero3.py [--reps 10] [--warmup 2] [--vocab 30522] [--hidden 256]
                                         [--layers 4] [--out benchmarks/results/deepspeed-zero3-cpu]

The community classes cannot run under ZeRO-3 as they are (``param.grad`` is None after
``engine.backward``; ``param.data`` is empty outside forward).  The workaround that trains
correctly, and the one measured here, reads each gradient with ``deepspeed.utils.
safe_get_full_grad`` (one all-gather of the full fp32 gradient per parameter) and perturbs /
restores the weights inside ``deepspeed.zero.GatheredParameters(params, modifier_rank=0)`` (an
all-gather on entry, a broadcast of the modified full weights from rank 0 and a re-partition on
exit).  The other one users try, ``safe_set_full_fp32_param``, writes the fp32 master copy, not
the weights the next forward gathers: it perturbs nothing, so it is not measured.

Model: BERT-shaped (vocab 30522, hidden 256, 4 layers, intermediate 1024; ZeRO-3 defaults, so
the 256x256 matrices below the 1e5-element persistence threshold stay gathered and the rest is
partitioned).  Bookkeeping only (no forward/backward in the timed region): FGM = attack +
restore on word_embeddings; PGD-3 = backup_grad + 3 attacks + restore_grad + restore; AWP =
one attack step + restore on every "weight".  Times are the median over reps of the slowest
rank; collectives are counted per step on rank 0 (torch.distributed calls and DeepSpeed's
communication backend, each call once).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time

import torch


METHODS = ("FGM", "PGD-3", "AWP")


# ------------------------------------------------------------------ the community workaround
class GatheredFGM:
    """Community FGM made to work under ZeRO-3: full gradients by safe_get_full_grad, weights
    modified inside GatheredParameters(modifier_rank=0)."""

    def __init__(self, engine, emb_name="word_embeddings", epsilon=1.0):
        self.params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad and emb_name in n]
        self.epsilon = epsilon
        self.backup = {}

    def attack(self):
        import deepspeed
        from deepspeed.utils import safe_get_full_grad
        grads = [safe_get_full_grad(p) for _, p in self.params]
        with deepspeed.zero.GatheredParameters([p for _, p in self.params], modifier_rank=0):
            for (name, p), g in zip(self.params, grads):
                self.backup[name] = p.data.clone()
                norm = torch.norm(g)
                if norm != 0 and not torch.isnan(norm):
                    p.data.add_(self.epsilon * g / norm)

    def restore(self):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in self.params], modifier_rank=0):
            for name, p in self.params:
                p.data.copy_(self.backup[name])
        self.backup = {}


class GatheredPGD:
    """Community PGD under ZeRO-3: as GatheredFGM, plus the projection, and backup_grad /
    restore_grad through safe_get_full_grad / safe_set_full_grad for every parameter."""

    def __init__(self, engine, epsilon=1.0, alpha=0.3, emb_name="word_embeddings"):
        self.engine = engine
        self.params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad and emb_name in n]
        self.epsilon, self.alpha = epsilon, alpha
        self.emb_backup, self.grad_backup = {}, {}

    def attack(self, is_first_attack=False):
        import deepspeed
        from deepspeed.utils import safe_get_full_grad
        grads = [safe_get_full_grad(p) for _, p in self.params]
        with deepspeed.zero.GatheredParameters([p for _, p in self.params], modifier_rank=0):
            for (name, p), g in zip(self.params, grads):
                if is_first_attack:
                    self.emb_backup[name] = p.data.clone()
                norm = torch.norm(g)
                if norm != 0 and not torch.isnan(norm):
                    p.data.add_(self.alpha * g / norm)
                    r = p.data - self.emb_backup[name]
                    if torch.norm(r) > self.epsilon:
                        r = self.epsilon * r / torch.norm(r)
                    p.data.copy_(self.emb_backup[name] + r)

    def restore(self):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in self.params], modifier_rank=0):
            for name, p in self.params:
                p.data.copy_(self.emb_backup[name])
        self.emb_backup = {}

    def backup_grad(self):
        from deepspeed.utils import safe_get_full_grad
        for name, p in self.engine.module.named_parameters():
            if p.requires_grad:
                self.grad_backup[name] = safe_get_full_grad(p).clone()

    def restore_grad(self):
        from deepspeed.utils import safe_set_full_grad
        for name, p in self.engine.module.named_parameters():
            if p.requires_grad:
                safe_set_full_grad(p, self.grad_backup[name])


class GatheredAWP:
    """The Kaggle AWP step under ZeRO-3: full gradients by safe_get_full_grad, every "weight"
    perturbed and clamped inside GatheredParameters(modifier_rank=0)."""

    def __init__(self, engine, adv_param="weight", adv_lr=1.0, adv_eps=0.2):
        self.params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad and adv_param in n]
        self.adv_lr, self.adv_eps = adv_lr, adv_eps
        self.backup, self.backup_eps = {}, {}

    def attack_step(self):
        import deepspeed
        from deepspeed.utils import safe_get_full_grad
        e = 1e-6
        grads = [safe_get_full_grad(p) for _, p in self.params]
        with deepspeed.zero.GatheredParameters([p for _, p in self.params], modifier_rank=0):
            for (name, p), g in zip(self.params, grads):
                if name not in self.backup:
                    self.backup[name] = p.data.clone()
                    grad_eps = self.adv_eps * p.abs().detach()
                    self.backup_eps[name] = (self.backup[name] - grad_eps, self.backup[name] + grad_eps)
                norm1, norm2 = torch.norm(g), torch.norm(p.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    p.data.add_(self.adv_lr * g / (norm1 + e) * (norm2 + e))
                    p.data = torch.min(torch.max(p.data, self.backup_eps[name][0]), self.backup_eps[name][1])

    def restore(self):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in self.params], modifier_rank=0):
            for name, p in self.params:
                p.data.copy_(self.backup[name])
        self.backup, self.backup_eps = {}, {}


# --------------------------------------------------------------------------- counting collectives
class Collectives:
    """Counts collective calls: torch.distributed's and DeepSpeed's communication backend's
    (``deepspeed.comm.comm.cdb``), each call once (a DeepSpeed call that goes through
    torch.distributed is not counted twice)."""

    NAMES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_base",
             "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce",
             "all_to_all_single", "allgather_fn", "reduce_scatter_fn", "inference_all_reduce")

    def __init__(self):
        self.count = 0
        self.by_name: dict[str, int] = {}
        self._depth = 0

    @contextlib.contextmanager
    def counting(self):
        import torch.distributed as dist
        from deepspeed.comm import comm as ds_comm
        patched = []

        def wrap(owner, name):
            fn = getattr(owner, name, None)
            if fn is None or not callable(fn):
                return

            def counted(*a, **k):
                if self._depth == 0:
                    self.count += 1
                    self.by_name[name] = self.by_name.get(name, 0) + 1
                self._depth += 1
                try:
                    return fn(*a, **k)
                finally:
                    self._depth -= 1

            setattr(owner, name, counted)
            patched.append((owner, name, fn))

        for name in self.NAMES:
            wrap(dist, name)
            if ds_comm.cdb is not None:
                wrap(ds_comm.cdb, name)
        # the backend caches its all-gather / reduce-scatter functions at init
        for attr in ("all_gather_function", "reduce_scatter_function"):
            if ds_comm.cdb is not None and getattr(ds_comm.cdb, attr, None) is not None:
                wrap(ds_comm.cdb, attr)
        try:
            yield self
        finally:
            for owner, name, fn in reversed(patched):
                setattr(owner, name, fn)


# ------------------------------------------------------------------------------------- a rank
def _runners(engine, provider: str):
    import fused_adv
    if provider == "fused":
        fgm = fused_adv.FGM(engine, emb_name="word_embeddings", epsilon=1.0)
        pgd = fused_adv.PGD(engine, epsilon=1.0, alpha=0.3)
        awp = fused_adv.AWP(engine, engine.optimizer, adv_lr=1e-3, adv_eps=1e-2)
        awp_step = lambda: awp.attack_step(first=True)  # noqa: E731
    else:
        fgm = GatheredFGM(engine)
        pgd = GatheredPGD(engine)
        awp = GatheredAWP(engine, adv_lr=1e-3, adv_eps=1e-2)
        awp_step = awp.attack_step

    def run_fgm():
        fgm.attack()
        fgm.restore()

    def run_pgd():
        pgd.backup_grad()
        for t in range(3):
            pgd.attack(is_first_attack=(t == 0))
        pgd.restore_grad()
        pgd.restore()

    def run_awp():
        awp_step()
        awp.restore()

    return {"FGM": run_fgm, "PGD-3": run_pgd, "AWP": run_awp}


def rank_main(rank, world, port, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger
    from transformers import BertConfig, BertForSequenceClassification
    logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=4, intermediate_size=4 * args.hidden, num_labels=2)
    model = BertForSequenceClassification(cfg)
    ds_cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                                      config=ds_cfg)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (4, 32), generator=g)
    labels = torch.randint(0, 2, (4,), generator=g)
    engine.backward(engine(input_ids=ids, labels=labels).loss)

    results = {}
    runners = {p: _runners(engine, p) for p in ("community", "fused")}
    for method in METHODS:
        for provider in ("community", "fused"):
            fn = runners[provider][method]
            counter = Collectives()
            with counter.counting():
                fn()
            times = []
            for rep in range(args.warmup + args.reps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if rep >= args.warmup:
                    times.append(dt)
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            results[f"{method}/{provider}"] = {"median_ms": statistics.median(t.tolist()) * 1e3,
                                               "collectives": counter.count, "by_name": counter.by_name}
    # the two providers perturb identically: the weights the next forward gathers after an attack
    engine.step()
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(results, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "deepspeed-zero3-cpu"))
    args = ap.parse_args(argv)
    import platform
    import torch.multiprocessing as mp
    os.makedirs(args.out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    mp.start_processes(rank_main, args=(2, port, args, args.out), nprocs=2, start_method="spawn")
    with open(os.path.join(args.out, "result.json")) as f:
        results = json.load(f)
    import deepspeed
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "cpu": platform.processor() or platform.machine(), "ranks": 2, "threads_per_rank": args.threads,
            "model": f"BERT vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers", "reps": args.reps}
    lines = [f"ZeRO-3, 2 CPU ranks ({meta['threads_per_rank']} thread each), {meta['model']}, torch {meta['torch']}, "
             f"deepspeed {meta['deepspeed']}, {meta['date']}; bookkeeping only, median of {args.reps} (slowest rank)",
             "", "| method | community workaround ms | fused ms | speed-up | collectives/step community → fused |",
             "|--------|------------------------:|---------:|---------:|-----------------------------------:|"]
    for m in METHODS:
        c, f_ = results[f"{m}/community"], results[f"{m}/fused"]
        lines.append(f"| {m} | {c['median_ms']:.1f} | {f_['median_ms']:.1f} | {c['median_ms'] / f_['median_ms']:.1f}× "
                     f"| {c['collectives']} → {f_['collectives']} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "zero3.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "zero3.md"), "w") as f:
        f.write(table + "\n")
    os.remove(os.path.join(args.out, "result.json"))


if __name__ == "__main__":
    main()
