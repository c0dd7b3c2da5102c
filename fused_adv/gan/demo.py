"""``fused-adv gan-demo``: plain WGAN-GP against ratio clipping + sample reweighting on digits.

Trains a small MLP generator and critic on scikit-learn's bundled 8×8 digits (1797 images, read
from a file inside the wheel; nothing is downloaded) on the CPU, twice per seed from the same
initial weights and the same seed:

  wgan-gp     critic −mean f(real) + mean f(fake) + 5·GP; generator −mean f(G(z))
  ppo-rw      the critic's fake term reweighted by W = B·softmax(f(fake)); the generator's
              loss the clipped surrogate with a ratio classifier (docs/methods.md §9 (GAN with
              probability-ratio clipping))

on the official schedule (Diters critic steps, then PPO_iters generator steps on the same
latents; Adam betas (0, 0.9), lr for the critic, lr/PPO_iters for G and the ratio classifier,
every lr decayed linearly to 0 over the run), so the two runs differ only in the two ingredients
of the method. One departure from the official settings: ``--lr`` defaults to 1e-3 (official
1e-4) so that a few hundred rounds of small MLPs learn the digits in minutes on a CPU.

Scores come from a digits classifier the demo trains on a split the GANs never see: a
classifier score (Inception-Score style, exp E KL(p(y|x) ‖ p(y)), at most 10) and a Fréchet
distance between Gaussians fitted to the classifier's penultimate features of generated and
real training images. Writes to ``--out`` (default ./gan_demo_results): samples_<variant>.png
(one grid per variant, first seed), curves.png (both scores over training, mean ± std over
seeds), gan_demo.md and gan_demo.json (final scores, mean ± std over seeds, and per seed).
``--tiny`` is a seconds-long smoke setting (the tests use it).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from fused_adv.gan.train import PPOGAN, PPOGANConfig, make_optimizers

VARIANTS = ("wgan-gp", "ppo-rw")
#: variant -> (ratio clipping, sample reweighting); "ppo" and "rw" are the one-ingredient ablations
VARIANT_FLAGS = {"wgan-gp": (False, False), "ppo-rw": (True, True), "ppo": (True, False), "rw": (False, True)}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_digits_split(seed: int = 0, gan_fraction: float = 0.5):
    """Digits scaled to [-1, 1], shape (N, 64), split once (fixed ``seed``) into the GANs' training
    images and the held-out images the scoring classifier learns from (stratified by class)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
        raise SystemExit("fused-adv gan-demo needs scikit-learn (pip install scikit-learn): its wheel "
                         "ships the 8x8 digits, so nothing is downloaded") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    gan_idx, held_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * gan_fraction))
        gan_idx.append(idx[:k])
        held_idx.append(idx[k:])
    gan_idx, held_idx = torch.cat(gan_idx), torch.cat(held_idx)
    return x[gan_idx], y[gan_idx], x[held_idx], y[held_idx]


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """z (B, nz) -> images (B, 64) in (-1, 1)."""

    def __init__(self, nz: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(nz, hidden), nn.ReLU(), nn.Linear(hidden, 2 * hidden), nn.ReLU(),
                                 nn.Linear(2 * hidden, 64), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class Critic(nn.Module):
    """images (B, 64) -> (scores (B, 1), penultimate features (B, hidden)); ``dropout`` > 0 makes it
    stochastic, which the consistency term needs."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 2 * hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout),
                                  nn.Linear(2 * hidden, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout))
        self.fc = nn.Linear(hidden, 1)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), h


class RatioClassifier(nn.Module):
    """images (B, 64) -> P(real) (B, 1) in (0, 1)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 2 * hidden), nn.LeakyReLU(0.2), nn.Linear(2 * hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x):
        return torch.sigmoid(self.net(x))


class DigitClassifier(nn.Module):
    """The scoring network: images (B, 64) -> (logits (B, 10), penultimate features (B, 64))."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), h


def train_classifier(x, y, *, epochs: int, seed: int = 0):
    """Trains ``DigitClassifier`` on 80% of (x, y) and returns (model in eval mode, accuracy on the
    other 20%)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = len(x) // 5
    va, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in tr[torch.randperm(len(tr), generator=g)].split(64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(clf(x[idx])[0], y[idx]).backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(x[va])[0].argmax(1) == y[va]).float().mean().item()
    return clf, acc


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
def classifier_score(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))): 1 for one class or uniform predictions, 10 at best."""
    logp = F.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    log_marg = torch.log(p.mean(0).clamp_min(1e-30))
    return math.exp((p * (logp - log_marg)).sum(1).mean().item())


def gaussian_stats(feats: torch.Tensor):
    f = feats.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(stats1, stats2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1^½ Σ2 Σ1^½)^½), in float64 with symmetric eigensolvers."""
    mu1, s1 = stats1
    mu2, s2 = stats2
    ev, q = torch.linalg.eigh(s1)
    s1h = q @ torch.diag(ev.clamp_min(0).sqrt()) @ q.T
    m = s1h @ s2 @ s1h
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


class Scorer:
    """Classifier score and Fréchet distance of generated images against the GANs' real images."""

    def __init__(self, clf: DigitClassifier, real: torch.Tensor):
        self.clf = clf
        with torch.no_grad():
            self.real_stats = gaussian_stats(clf(real)[1])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[float, float]:
        logits, feats = self.clf(images)
        return classifier_score(logits), frechet_distance(gaussian_stats(feats), self.real_stats)


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
def run_variant(variant: str, seed: int, x_train: torch.Tensor, scorer: Scorer, args, bar=None) -> dict:
    """Trains one GAN; returns its score curve, final scores, wall time and a sample grid tensor."""
    torch.manual_seed(seed)
    G = Generator(args.nz, args.hidden)
    critic = Critic(args.hidden, args.dropout)
    D = RatioClassifier(args.hidden)  # built for both variants so both consume the same RNG draws
    ppo, rw = VARIANT_FLAGS[variant]
    cfg = PPOGANConfig(nz=args.nz, diters=args.diters, ppo_iters=args.ppo_iters, clip=args.clip, lr=args.lr,
                       ratio_clip=ppo, reweight=rw, consistency=args.consistency)
    opt_g, opt_c, opt_d = make_optimizers(G, critic, D if ppo else None, cfg)
    # the official linear decay of every learning rate to 0 over the run, stepped once per round
    decay = lambda r: max(0.0, 1.0 - r / args.rounds)  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_c, opt_d) if o is not None]
    gan = PPOGAN(G, critic, D if ppo else None, opt_g, opt_c, opt_d, cfg)
    data_gen = torch.Generator().manual_seed(seed + 1)

    def batches():
        return x_train[torch.randint(len(x_train), (args.batch_size,), generator=data_gen)]

    eval_z = torch.randn(args.eval_samples, args.nz, generator=torch.Generator().manual_seed(seed + 2))
    curve = []

    def evaluate(r, stats):
        G.eval()
        with torch.no_grad():
            cs, fd = scorer(G(eval_z))
        G.train()
        curve.append({"round": r, "score": cs, "fd": fd, **stats})

    t0 = time.perf_counter()
    evaluate(0, {})
    stats = {}
    for r in range(1, args.rounds + 1):
        stats = gan.train_step(batches)
        for s in scheds:
            s.step()
        if r % args.eval_every == 0 or r == args.rounds:
            evaluate(r, stats)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{curve[-1]['score']:.2f}", fd=f"{curve[-1]['fd']:.1f}", refresh=False)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        grid = G(eval_z[:100])
    return {"variant": variant, "seed": seed, "curve": curve, "score": curve[-1]["score"], "fd": curve[-1]["fd"],
            "wall_s": wall, "last_losses": stats, "counts": {"rounds": gan.rounds, "critic_steps": gan.critic_steps,
                                                               "ratio_steps": gan.ratio_steps,
                                                               "generator_steps": gan.generator_steps},
            "_grid": grid}


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def _mean_std(vals):
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: list[dict], real_ref: dict) -> list[dict]:
    rows = []
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        cs, fd, wall = _mean_std([r["score"] for r in rs]), _mean_std([r["fd"] for r in rs]), _mean_std(
            [r["wall_s"] for r in rs])
        row = {"variant": v, "seeds": len(rs), "score_mean": cs[0], "score_std": cs[1], "fd_mean": fd[0],
               "fd_std": fd[1], "wall_s_mean": wall[0]}
        if "clipped_frac" in rs[0]["last_losses"]:
            # the ratio classifier's state over the run: share of samples with r > 1 + c (no
            # gradient through r) and mean D(G(z)), averaged over the evaluation points and seeds
            pts = [p for r in rs for p in r["curve"][1:]]
            row["clipped_frac"] = statistics.fmean(p["clipped_frac"] for p in pts)
            row["below_frac"] = statistics.fmean(p["below_frac"] for p in pts)
            row["d_fake"] = statistics.fmean(p["d_fake"] for p in pts)
            row["ratio_loss"] = statistics.fmean(p["ratio_loss"] for p in pts)
        rows.append(row)
    rows.append({"variant": "real (held-out)", "seeds": 1, "score_mean": real_ref["score"], "score_std": 0.0,
                 "fd_mean": real_ref["fd"], "fd_std": 0.0, "wall_s_mean": 0.0})
    return rows


def markdown_table(rows: list[dict]) -> str:
    out = ["| variant | seeds | classifier score ↑ (mean ± std) | Fréchet distance ↓ (mean ± std) | s per run |",
           "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['seeds']} | {r['score_mean']:.2f} ± {r['score_std']:.2f} | "
                   f"{r['fd_mean']:.2f} ± {r['fd_std']:.2f} | {r['wall_s_mean']:.1f} |")
    return "\n".join(out)


def save_grid(images: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = 10
    rows = math.ceil(n / cols)
    canvas = torch.zeros(rows * 9 - 1, cols * 9 - 1)  # white gaps in gray_r
    for i, img in enumerate(images.reshape(n, 8, 8)):
        r, c = divmod(i, cols)
        canvas[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = (img + 1) / 2
    fig, ax = plt.subplots(figsize=(5, 5 * rows / cols + 0.4))
    ax.imshow(canvas.clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curves(runs: list[dict], real_ref: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax, label in (("score", axes[0], "classifier score (higher is better)"),
                           ("fd", axes[1], "Fréchet distance (lower is better)")):
        variants = list(dict.fromkeys(r["variant"] for r in runs))
        for v, color in zip(variants, ("tab:blue", "tab:red", "tab:green", "tab:orange")):
            rs = [r for r in runs if r["variant"] == v]
            xs = [p["round"] for p in rs[0]["curve"]]
            vals = torch.tensor([[p[key] for p in r["curve"]] for r in rs], dtype=torch.float64)
            m = vals.mean(0)
            s = vals.std(0) if len(rs) > 1 else torch.zeros_like(m)
            ax.plot(xs, m.numpy(), color=color, label=f"{v} (mean of {len(rs)} seeds)")
            ax.fill_between(xs, (m - s).numpy(), (m + s).numpy(), color=color, alpha=0.2)
        ax.axhline(real_ref[key], color="gray", ls="--", lw=1, label="real held-out digits")
        ax.set_xlabel("round (Diters critic + PPO_iters generator steps)")
        ax.set_title(label, fontsize=10)
        if key == "fd":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from wgan-gp, ppo-rw, ppo (clipping only), rw (reweighting only)")
    p.add_argument("--rounds", type=int, default=300, help="training rounds per run (default 300)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nz", type=int, default=32, help="latent size")
    p.add_argument("--hidden", type=int, default=128, help="MLP width (G: nz-h-2h-64, critic: 64-2h-h-1)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="critic lr (default 1e-3: 10x the official 1e-4, so that a few hundred rounds suffice); "
                        "G and the ratio classifier get lr/ppo-iters")
    p.add_argument("--diters", type=int, default=5)
    p.add_argument("--ppo-iters", type=int, default=5)
    p.add_argument("--clip", type=float, default=0.4)
    p.add_argument("--dropout", type=float, default=0.0, help="critic dropout (the consistency term needs > 0)")
    p.add_argument("--consistency", action="store_true", help="add the consistency term (weight 2) in both variants")
    p.add_argument("--eval-every", type=int, default=25, help="rounds between score evaluations")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--classifier-epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", default="gan_demo_results")
    p.add_argument("--tiny", action="store_true", help="smoke setting: 2 seeds, a few rounds, small nets (tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main_args(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.tiny:
        args.seeds, args.rounds, args.hidden, args.nz = min(args.seeds, 2), 6, 32, 8
        args.eval_every, args.eval_samples, args.classifier_epochs, args.batch_size = 3, 200, 5, 32
    if args.seeds < 1 or args.rounds < 1:
        raise SystemExit("--seeds and --rounds must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    x_gan, _, x_held, y_held = load_digits_split()
    clf, clf_acc = train_classifier(x_held, y_held, epochs=args.classifier_epochs)
    scorer = Scorer(clf, x_gan)
    real_score, real_fd = scorer(x_held)
    real_ref = {"score": real_score, "fd": real_fd}

    runs = []
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANT_FLAGS]
    if bad or not variants:
        raise SystemExit(f"--variants: unknown {bad}; choose from {', '.join(VARIANT_FLAGS)}")
    total = args.seeds * len(variants) * args.rounds
    with tqdm(total=total, desc="gan-demo", unit="round", disable=args.quiet, file=sys.stderr) as bar:
        for seed in range(args.seeds):
            for v in variants:
                bar.set_description(f"{v} seed {seed}")
                runs.append(run_variant(v, seed, x_gan, scorer, args, bar))

    for v in variants:
        first = next(r for r in runs if r["variant"] == v)
        save_grid(first["_grid"], out / f"samples_{v}.png",
                  f"{v}, seed 0, round {args.rounds}: score {first['score']:.2f}, FD {first['fd']:.2f}")
    save_curves(runs, real_ref, out / "curves.png")
    rows = summarize(runs, real_ref)
    table = markdown_table(rows)
    wall = time.perf_counter() - t_start
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "quiet", "func", "command")}
    from fused_adv._bench import report

    meta = {"date": report.utc_now(), "cpu": report.cpu_name(), "torch": torch.__version__,
            "threads": args.threads, "total_wall_s": wall, "classifier_val_accuracy": clf_acc,
            "gan_train_images": len(x_gan), "held_out_images": len(x_held)}
    res = {"meta": meta, "setup": setup, "real_reference": real_ref, "summary": rows,
           "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]}
    (out / "gan_demo.json").write_text(json.dumps(res, indent=1))
    md = [f"# fused-adv gan-demo ({meta['date']}, {meta['cpu']}, torch {meta['torch']}, {args.threads} thread(s))", "",
          f"Digits: {len(x_gan)} images train the GANs, {len(x_held)} held-out images train the scoring classifier "
          f"(validation accuracy {clf_acc:.3f}). Scores of {args.eval_samples} samples after {args.rounds} rounds "
          f"(Diters {args.diters} + PPO_iters {args.ppo_iters}), mean ± std over {args.seeds} seeds; "
          f"'real (held-out)' scores the held-out real digits the same way.", "", table, "",
          *[f"{r['variant']}: over the run (evaluation points, all seeds) the ratio classifier's BCE averaged "
            f"{r['ratio_loss']:.3g}, mean D(G(z)) {r['d_fake']:.3g}, and {100 * r['clipped_frac']:.1f}% of the "
            f"generator's samples had r > 1 + c (clipped: no gradient through r), "
            f"{100 * r['below_frac']:.1f}% had r < 1 − c (gradient through the critic scaled by r)."
            for r in rows if "clipped_frac" in r],
          "",
          f"Total wall time {wall:.0f} s."]
    (out / "gan_demo.md").write_text("\n".join(md) + "\n")
    print(table)
    print(f"classifier validation accuracy {clf_acc:.3f}; total {wall:.1f} s; outputs in {out}/")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_adv.gan.demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
