"""CPU bookkeeping speed: attack + restore (no forward/backward) of FGM, PGD-3 and AWP.

Providers, interleaved run by run so that machine noise hits all of them alike:
  community  the per-parameter Python classes of fused_adv.reference (SPEC.md), or literal copies
             of them below when fused_adv.reference is not importable;
  torch      the multi-tensor op sequence on the pure-PyTorch backend (fused_adv/_torch/weight.py);
  cpp        the same op sequence on the compiled CPU kernels (csrc/cpu/weight.cpp).
Parameter set: BERT-shaped (vocab 30522, hidden 256, 4 layers, intermediate 1024; 11.2M params),
random weights and gradients; the embedding gradients are nonzero only in the rows of one 4x64
batch, as a real backward pass leaves them (--dense-grads: random everywhere).  FGM / PGD perturb word_embeddings; AWP
perturbs every parameter whose name contains "weight".  PGD-3 = backup_grad, 3 attacks (the first
one included), restore_grad, restore; the fused sequence sets the clean grads aside (no copy).

    python benchmarks/bookkeeping_cpu.py [--reps 30] [--warmup 3] [--threads N] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Run as a plain script from anywhere: import this checkout's fused_adv, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fused_adv import ops  # noqa: E402


# ---- the parameter set -------------------------------------------------------------------
class _Layer(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.attention = nn.ModuleDict(dict(
            query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h),
            output=nn.ModuleDict(dict(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h)))))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(h, inter)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(inter, h), LayerNorm=nn.LayerNorm(h)))


class BertShaped(nn.Module):
    """Parameters named and shaped as HF BertModel (no forward: only the bookkeeping is timed)."""

    def __init__(self, vocab=30522, hidden=256, layers=4, intermediate=1024, max_pos=512):
        super().__init__()
        self.embeddings = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(vocab, hidden), position_embeddings=nn.Embedding(max_pos, hidden),
            token_type_embeddings=nn.Embedding(2, hidden), LayerNorm=nn.LayerNorm(hidden)))
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(_Layer(hidden, intermediate) for _ in range(layers))))
        self.pooler = nn.ModuleDict(dict(dense=nn.Linear(hidden, hidden)))


def make_model(dtype: torch.dtype, dense: bool = False, batch: int = 4, seq: int = 64) -> nn.Module:
    """Random weights and gradients.  By default the embedding gradients are what a backward
    pass gives: nonzero only in the rows of the tokens (positions, token type 0) of one
    batch x seq batch; every other gradient is dense.  ``dense``: every gradient entry random."""
    torch.manual_seed(0)
    model = BertShaped().to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    if not dense:
        emb = model.embeddings
        vocab = emb.word_embeddings.weight.shape[0]
        for table, rows in ((emb.word_embeddings, torch.randint(0, vocab, (batch * seq,))),
                            (emb.position_embeddings, torch.arange(seq)),
                            (emb.token_type_embeddings, torch.tensor([0]))):
            keep = torch.zeros(table.weight.shape[0], dtype=torch.bool)
            keep[rows] = True
            table.weight.grad[~keep] = 0
    return model


# ---- community classes (fallback copies of fused_adv.reference, SPEC.md sections 1, 3, 4) ----
class _FGM:
    def __init__(self, model, emb_name="word_embeddings", epsilon=1.0):
        self.model, self.emb_name, self.epsilon, self.backup = model, emb_name, epsilon, {}

    def attack(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    param.data.add_(self.epsilon * param.grad / norm)

    def restore(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                param.data = self.backup[name]
        self.backup = {}


class _PGD:
    def __init__(self, model, epsilon=1.0, alpha=0.3, emb_name="word_embeddings"):
        self.model, self.epsilon, self.alpha, self.emb_name = model, epsilon, alpha, emb_name
        self.emb_backup, self.grad_backup = {}, {}

    def attack(self, is_first_attack=False):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    param.data.add_(self.alpha * param.grad / norm)
                    r = param.data - self.emb_backup[name]
                    if torch.norm(r) > self.epsilon:
                        r = self.epsilon * r / torch.norm(r)
                    param.data = self.emb_backup[name] + r

    def restore(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                param.data = self.emb_backup[name]
        self.emb_backup = {}

    def backup_grad(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = self.grad_backup[name]


class _AWP:
    def __init__(self, model, optimizer=None, adv_param="weight", adv_lr=1.0, adv_eps=0.2):
        self.model, self.adv_param, self.adv_lr, self.adv_eps = model, adv_param, adv_lr, adv_eps
        self.backup, self.backup_eps = {}, {}

    def _attack_step(self):
        e = 1e-6
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name and name in self.backup:
                norm1 = torch.norm(param.grad)
                norm2 = torch.norm(param.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    param.data.add_(self.adv_lr * param.grad / (norm1 + e) * (norm2 + e))
                    param.data = torch.min(torch.max(param.data, self.backup_eps[name][0]), self.backup_eps[name][1])

    def _save(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                if name not in self.backup:
                    self.backup[name] = param.data.clone()
                    grad_eps = self.adv_eps * param.abs().detach()
                    self.backup_eps[name] = (self.backup[name] - grad_eps, self.backup[name] + grad_eps)

    def _restore(self):
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup, self.backup_eps = {}, {}


def community_classes():
    try:
        from fused_adv.reference import AWP, FGM, PGD
        return FGM, PGD, AWP, "fused_adv.reference"
    except ImportError:
        return _FGM, _PGD, _AWP, "inline copies (fused_adv.reference not importable)"


# ---- one attack + restore per provider ---------------------------------------------------
def community_runners(model):
    FGM, PGD, AWP, _ = community_classes()
    fgm, pgd, awp = FGM(model), PGD(model), AWP(model, None)

    def run_fgm():
        fgm.attack()
        fgm.restore()

    def run_pgd():
        pgd.backup_grad()
        for t in range(3):
            pgd.attack(is_first_attack=(t == 0))
        pgd.restore_grad()
        pgd.restore()

    def run_awp():  # attack_backward without the forward/backward: save, 1 step, restore
        awp._save()
        awp._attack_step()
        awp._restore()

    return dict(FGM=run_fgm, **{"PGD-3": run_pgd}, AWP=run_awp)


def fused_runners(model, backend: str):
    # .detach(): the same storage without autograd tracking (the fused classes mutate weights
    # under no_grad as the community classes do through .data).
    named = [(n, p) for n, p in model.named_parameters()]
    emb = [p.detach() for n, p in named if "word_embeddings" in n]
    awp = [p.detach() for n, p in named if "weight" in n]
    emb_b = [torch.empty_like(p) for p in emb]  # allocated once: steady state allocates nothing
    awp_b = [torch.empty_like(p) for p in awp]
    k = dict(backend=backend)

    emb_g = [p.grad for n, p in named if "word_embeddings" in n]
    awp_g = [p.grad for n, p in named if "weight" in n]

    def grads(ps):
        return emb_g if ps is emb else awp_g

    def run_fgm():
        g = grads(emb)
        gs = ops.multi_tensor_sumsq(g, **k)
        ops.fgm_perturb_(emb, g, emb_b, gs, 1.0, True, **k)
        ops.restore_(emb, emb_b, **k)

    def run_pgd():
        g = grads(emb)  # the clean grads are set aside (no copy); the adversarial ones would differ
        for t in range(3):
            st = ops.pgd_reduce(emb, g, emb_b, t == 0, **k)
            ops.pgd_perturb_(emb, g, emb_b, st, 0.3, 1.0, t == 0, **k)
        ops.restore_(emb, emb_b, **k)

    def run_awp():
        g = grads(awp)
        n = len(awp)
        sq = ops.multi_tensor_sumsq(g + awp, **k)  # ||G||^2 and ||P||^2 of every tensor, one pass
        ops.awp_perturb_(awp, g, awp_b, sq[:n], sq[n:], 1.0, 0.2, True, **k)
        ops.restore_(awp, awp_b, **k)

    return dict(FGM=run_fgm, **{"PGD-3": run_pgd}, AWP=run_awp)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30, help="timed runs per provider and method")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--providers", default="community,torch,cpp")
    ap.add_argument("--dense-grads", action="store_true",
                    help="random gradient in every embedding row (default: only the rows of one 4x64 batch)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    providers = args.providers.split(",")
    runners = {}
    for prov in providers:
        model = make_model(dtype, args.dense_grads)  # one model per provider: the community restore re-points .data
        if prov == "community":
            runners[prov] = community_runners(model)
        else:
            reason = ops.why_not(prov, torch.device("cpu"), "fgm_perturb_")
            if reason:
                print(f"skipping provider {prov}: {reason}")
                continue
            runners[prov] = fused_runners(model, prov)
    providers = [p for p in providers if p in runners]
    methods = ["FGM", "PGD-3", "AWP"]
    times = {(p, m): [] for p in providers for m in methods}
    for m in methods:
        for rep in range(args.warmup + args.reps):
            for p in providers:  # interleaved
                t0 = time.perf_counter()
                runners[p][m]()
                dt = time.perf_counter() - t0
                if rep >= args.warmup:
                    times[(p, m)].append(dt)
    model = make_model(dtype, args.dense_grads)
    n_params = sum(p.numel() for p in model.parameters())
    n_awp = sum(p.numel() for n, p in model.named_parameters() if "weight" in n)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, BERT-shaped "
          f"{n_params / 1e6:.1f}M params (AWP perturbs {n_awp / 1e6:.1f}M), embedding grads: {'dense' if args.dense_grads else 'rows of one 4x64 batch'}, "
          f"community = {community_classes()[3]}")
    print(f"median of {args.reps} interleaved runs, ms (speed-up vs community)")
    head = f"{'method':8s}" + "".join(f"{p:>22s}" for p in providers)
    print(head)
    print("-" * len(head))
    for m in methods:
        base = statistics.median(times[("community", m)]) if "community" in providers else None
        row = f"{m:8s}"
        for p in providers:
            med = statistics.median(times[(p, m)])
            cell = f"{med * 1e3:.2f}" + (f" ({base / med:.2f}x)" if base else "")
            row += f"{cell:>22s}"
        print(row)


if __name__ == "__main__":
    main()
