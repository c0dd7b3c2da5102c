"""CPU bookkeeping speed: attack + restore (no forward/backward) of FGM, PGD-3 and AWP, and
SAM / ASAM's first_step + second_step without the base update, MI-FGSM-3 and the AWP paper's
calc_awp + perturb + restore (``--methods``;
``python benchmarks/bookkeeping_cpu.py`` runs :func:`main`).

Providers, interleaved run by run so that machine noise hits all of them alike:
  community  the per-parameter Python classes of fused_adv.reference (docs/methods.md §1 (FGM),
             §3 (PGD), §4 (AWP (Kaggle)));
  foreach    the same math in torch._foreach_* ops, host-sync free (fused_adv._bench.foreach):
             the rewrite a PyTorch expert would write;
  torch      the drop-in classes (fused_adv.FGM/PGD/AWP) on the pure-PyTorch backend;
  cpp        the same on the compiled CPU kernels (csrc/cpu/weight.cpp);
  cpp-swap   cpp with restore_mode="swap" (restore re-points .data, as the community classes do).
Parameter set: BERT-shaped (vocab 30522, hidden 256, 4 layers, intermediate 1024; 11.2M params),
random weights and gradients; the embedding gradients are nonzero only in the rows of one 4x64
batch, as a real backward pass leaves them (--dense-grads: random everywhere).  FGM / PGD perturb word_embeddings; AWP
perturbs every parameter whose name contains "weight".  PGD-3 = backup_grad, 3 attacks (the first
one included), restore_grad, restore; the fused class sets the clean grads aside (no copy).

    python benchmarks/bookkeeping_cpu.py [--reps 30] [--warmup 3] [--threads N] [--dtype float32]
                                         [--providers community,foreach,torch,cpp,cpp-swap]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fused_adv
from fused_adv import ops, reference
from fused_adv._bench import foreach


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


# ---- one attack + restore per provider ---------------------------------------------------
def _runners(fgm, pgd, awp_step, awp_restore):
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
        awp_step()
        awp_restore()

    return dict(FGM=run_fgm, **{"PGD-3": run_pgd}, AWP=run_awp)


def community_runners(model):
    awp = reference.AWP(model, None)

    def awp_step():
        awp._save()
        awp._attack_step()

    return _runners(reference.FGM(model), reference.PGD(model), awp_step, awp._restore)


def foreach_runners(model):
    """The torch._foreach_* rewrite (fused_adv._bench.foreach), same steps as the others."""
    awp = foreach.AWP(model, None)

    def awp_step():
        awp.save()
        awp.attack_step()

    return _runners(foreach.FGM(model), foreach.PGD(model), awp_step, awp.restore)


def fused_runners(model, backend: str, restore_mode: str = "copy"):
    """The drop-in classes themselves (their Python overhead included), on one backend."""
    k = dict(backend=backend, restore_mode=restore_mode)
    awp = fused_adv.AWP(model, None, **k)
    return _runners(fused_adv.FGM(model, **k), fused_adv.PGD(model, **k), lambda: awp.attack_step(first=True),
                    awp.restore)


class _NoStep(torch.optim.Optimizer):
    """A base optimizer whose step does nothing: SAM's bookkeeping is timed without the update
    every provider would share."""

    def __init__(self, params, **_):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


SAM_RHO = {"SAM": 0.05, "ASAM": 2.0}


def sam_runners(model, provider: str):
    """SAM and ASAM bookkeeping: first_step + second_step (restore, then a no-op base step) over
    every parameter (docs/methods.md §11 (SAM)).  ``provider``: community | foreach | <backend>."""
    out = {}
    for name, rho in SAM_RHO.items():
        adaptive = name == "ASAM"
        if provider == "community":
            opt = reference.SAM(model.parameters(), _NoStep, rho=rho, adaptive=adaptive)
        elif provider == "foreach":
            opt = foreach.SAM(model.parameters(), rho=rho, adaptive=adaptive)
        else:
            opt = fused_adv.SAM(model.parameters(), _NoStep, rho=rho, adaptive=adaptive, backend=provider)

        def run(opt=opt):
            opt.first_step()
            opt.second_step()
        out[name] = run
    return out


def weight_ext_runners(model, provider: str):
    """MI-FGSM-3 (PGD-3's step: backup_grad, 3 attacks, restore_grad, restore; docs/methods.md §2b
    (MI-FGSM)) and the paper's AWP (calc_awp + perturb + restore, docs/methods.md §4b (AWP (paper)))
    whose loss is a stand-in with a free forward and a backward that writes a copy of the clean
    gradients (fused_adv._bench.providers._GivenGrads).  ``provider``: community | <backend>; the
    fused AWP runs without a proxy."""
    import copy

    from fused_adv._bench.providers import _GivenGrads

    if provider == "community":
        mi = reference.MIFGSM(model, epsilon=1.0, steps=3)
        proxy = copy.deepcopy(model)
        for p in proxy.parameters():
            p.grad = None
        awp = reference.AdvWeightPerturb(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.01), 0.01)
    else:
        mi = fused_adv.MIFGSM(model, epsilon=1.0, steps=3, backend=provider)
        awp = fused_adv.AdvWeightPerturb(model, gamma=0.01, backend=provider)
    names = [n for n, p in model.named_parameters() if "weight" in n and p.dim() > 1]
    given = [dict(model.named_parameters())[n].grad for n in names]

    def closure(m):
        named = dict(m.named_parameters())
        return _GivenGrads.apply(given, *[named[n] for n in names])

    def run_mi():
        mi.backup_grad()
        for t in range(3):
            mi.attack(is_first_attack=(t == 0))
        mi.restore_grad()
        mi.restore()

    def run_awp_paper():
        diff = awp.calc_awp(closure=closure)
        awp.perturb(diff)
        awp.restore(diff)

    return {"MI-FGSM-3": run_mi, "AWP-paper": run_awp_paper}


WEIGHT_EXT = ("MI-FGSM-3", "AWP-paper")


def main(argv=None) -> None:
    """Parses ``argv`` (default: sys.argv[1:]), times every provider's FGM / PGD-3 / AWP
    bookkeeping interleaved, prints the medians.  A provider whose backend cannot run here is
    skipped with the reason; an unknown provider name raises SystemExit."""
    ap = argparse.ArgumentParser(prog="bookkeeping_cpu.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30, help="timed runs per provider and method")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--providers", default="community,foreach,torch,cpp,cpp-swap",
                    help="community | foreach | <backend> | <backend>-swap (restore_mode='swap': restore by "
                         "re-pointing .data)")
    ap.add_argument("--methods", default="FGM,PGD-3,AWP",
                    help="comma-separated subset of FGM, PGD-3, AWP, SAM, ASAM, MI-FGSM-3, AWP-paper "
                         "(SAM/ASAM: every parameter; AWP-paper: weights of dim > 1)")
    ap.add_argument("--dense-grads", action="store_true",
                    help="random gradient in every embedding row (default: only the rows of one 4x64 batch)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    providers = args.providers.split(",")
    runners = {}
    for prov in providers:
        model = make_model(dtype, args.dense_grads)  # one model per provider: the community restore re-points .data
        if prov == "community":
            runners[prov] = {**community_runners(model), **sam_runners(model, prov),
                             **weight_ext_runners(model, prov)}
        elif prov == "foreach":
            runners[prov] = {**foreach_runners(model), **sam_runners(model, prov)}
        else:
            backend, _, swap = prov.partition("-")
            if backend not in ops.BACKENDS or swap not in ("", "swap"):
                raise SystemExit(f"unknown provider {prov!r}: community, foreach, <backend> or <backend>-swap "
                                 f"with a backend from {', '.join(ops.BACKENDS)}")
            reason = ops.why_not(backend, torch.device("cpu"), "fgm_perturb_")
            if reason:
                print(f"skipping provider {prov}: {reason}")
                continue
            runners[prov] = fused_runners(model, backend, "swap" if swap else "copy")
            if not swap:  # SAM restores by copy only (its backups live in optimizer state)
                runners[prov].update(sam_runners(model, backend))
                runners[prov].update(weight_ext_runners(model, backend))
    providers = [p for p in providers if p in runners]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ("FGM", "PGD-3", "AWP", *SAM_RHO, *WEIGHT_EXT)]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: FGM, PGD-3, AWP, SAM, ASAM, MI-FGSM-3, AWP-paper")
    times = {(p, m): [] for p in providers for m in methods}
    for m in methods:
        for rep in range(args.warmup + args.reps):
            for p in providers:  # interleaved
                if m not in runners[p]:
                    continue
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
          "community = fused_adv.reference; foreach = its torch._foreach_* rewrite; fused = the drop-in classes")
    print(f"median of {args.reps} interleaved runs, ms (speed-up vs community)")
    head = f"{'method':8s}" + "".join(f"{p:>22s}" for p in providers)
    print(head)
    print("-" * len(head))
    for m in methods:
        base = statistics.median(times[("community", m)]) if "community" in providers else None
        row = f"{m:8s}"
        for p in providers:
            if not times[(p, m)]:
                row += f"{'-':>22s}"
                continue
            med = statistics.median(times[(p, m)])
            cell = f"{med * 1e3:.2f}" + (f" ({base / med:.2f}x)" if base else "")
            row += f"{cell:>22s}"
        print(row)
