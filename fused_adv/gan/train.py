"""Training helper: one round of the official schedule (docs/methods.md §9 (GAN with
probability-ratio clipping)).

A round is what the authors' CIFAR-10 loop does between two generator-progress counts:

1. ``diters`` critic steps, each on a fresh real batch and fresh latents: −mean f(real) +
   [reweighted] mean f(fake) + GP (+ consistency term), Adam step;
2. with the latents z of the last critic step: D0 = D(G_old(z)) and P0 = (1 − D0)/max(D0, 1e-7),
   frozen for the round;
3. ``ppo_iters`` times: one ratio-classifier step (BCE on a fresh real batch against fresh fakes,
   grad-norm clip, Adam step), then one generator step on the same z with the clipped surrogate
   (Adam step).

With ``ratio_clip=False`` step 3 trains only G, with −mean f(G(z)) on the same z (no ratio
classifier, no real batches); with ``reweight=False`` the critic's fake term is the plain mean.
Both off is plain WGAN-GP on the same schedule, which is the demo's baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from fused_adv.gan.losses import (clipped_surrogate, consistency_term, critic_scores, frozen_p_old,
                                  gradient_penalty, probability_ratio, ratio_classifier_loss, wgan_critic_loss)


@dataclass
class PPOGANConfig:
    """The official hyperparameters (cifar10/conf.yml of the authors' code) as defaults.

    ``lr``: the critic's learning rate; G and the ratio classifier use lr / ppo_iters
    (``make_optimizers``). ``gp_weight`` LAMBDA, ``ct_weight`` LAMBDA2, ``factor_m`` Factor_M,
    ``max_grad_norm`` the clip on the ratio classifier's gradient norm, ``clip`` the ratio clip.
    """
    nz: int = 128
    diters: int = 5
    ppo_iters: int = 5
    clip: float = 0.4
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    gp_weight: float = 5.0
    ct_weight: float = 2.0
    factor_m: float = 0.0
    max_grad_norm: float = 0.5
    ratio_clip: bool = True
    reweight: bool = True
    consistency: bool = False

    def __post_init__(self):
        if self.diters < 1 or self.ppo_iters < 1:
            raise ValueError(f"diters and ppo_iters must be >= 1, got {self.diters}, {self.ppo_iters}")
        if not 0.0 <= self.clip < 1.0:
            raise ValueError(f"clip must be in [0, 1), got {self.clip}")


def make_optimizers(generator: nn.Module, critic: nn.Module, ratio_classifier: nn.Module | None,
                    config: PPOGANConfig) -> tuple[torch.optim.Adam, torch.optim.Adam, torch.optim.Adam | None]:
    """Adam(betas=config.betas) for G (lr/ppo_iters), the critic (lr) and the ratio classifier
    (lr/ppo_iters; None when ``ratio_classifier`` is None), as the official code builds them."""
    sub_lr = config.lr / config.ppo_iters
    opt_g = torch.optim.Adam(generator.parameters(), lr=sub_lr, betas=config.betas)
    opt_c = torch.optim.Adam(critic.parameters(), lr=config.lr, betas=config.betas)
    opt_d = (torch.optim.Adam(ratio_classifier.parameters(), lr=sub_lr, betas=config.betas)
             if ratio_classifier is not None else None)
    return opt_g, opt_c, opt_d


class _frozen:
    """requires_grad off for a module's parameters inside the block: the generator's backward
    then computes no weight gradients for the critic and the ratio classifier (the official code
    computes them and zeroes them before use; the G gradient is the same)."""

    def __init__(self, *modules):
        self.params = [p for m in modules if m is not None for p in m.parameters()]

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)


class PPOGAN:
    """The training loop of docs/methods.md §9, one round per ``train_step``.

    Args:
        generator: z (B, nz) -> samples (B, ...).
        critic: samples -> scores (B, 1), or (scores, features (B, K)) — features are needed
            only with ``config.consistency`` (and the critic must be stochastic, e.g. dropout
            in train mode, for that term to be non-zero).
        ratio_classifier: samples -> probabilities (B, 1) in (0, 1); may be None when
            ``config.ratio_clip`` is False.
        opt_g, opt_critic, opt_ratio: their optimizers (``make_optimizers`` builds the official
            ones); ``opt_ratio`` may be None with the ratio classifier.
        config: ``PPOGANConfig``.

    Mutates the three modules' parameters and ``.grad`` and the optimizers' state. Counters
    ``rounds``, ``critic_steps``, ``ratio_steps``, ``generator_steps`` count what ran.
    """

    def __init__(self, generator: nn.Module, critic: nn.Module, ratio_classifier: nn.Module | None,
                 opt_g: torch.optim.Optimizer, opt_critic: torch.optim.Optimizer,
                 opt_ratio: torch.optim.Optimizer | None, config: PPOGANConfig | None = None):
        self.config = config or PPOGANConfig()
        if self.config.ratio_clip and (ratio_classifier is None or opt_ratio is None):
            raise ValueError("ratio_clip=True needs a ratio classifier and its optimizer")
        self.generator, self.critic, self.ratio_classifier = generator, critic, ratio_classifier
        self.opt_g, self.opt_critic, self.opt_ratio = opt_g, opt_critic, opt_ratio
        self.rounds = self.critic_steps = self.ratio_steps = self.generator_steps = 0

    # -- pieces -----------------------------------------------------------------------------
    def _latents(self, b: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(b, self.config.nz, device=like.device, dtype=like.dtype)

    def critic_step(self, real: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """One critic update on ``real`` (B, ...); returns (stats, z) with z the latents used,
        which the generator round reuses after the last critic step."""
        cfg = self.config
        self.opt_critic.zero_grad(set_to_none=True)
        out1 = self.critic(real)
        s_real = critic_scores(out1)
        ct = real.new_zeros(())
        if cfg.consistency:
            out2 = self.critic(real)
            if not isinstance(out1, (tuple, list)):
                raise ValueError("consistency=True needs a critic returning (scores, features)")
            ct = consistency_term(out1[0], out2[0], out1[1], out2[1], cfg.ct_weight, cfg.factor_m)
        z = self._latents(real.shape[0], real)
        with torch.no_grad():
            fake = self.generator(z)
        s_fake = critic_scores(self.critic(fake))
        w_loss = wgan_critic_loss(s_real, s_fake, reweight=cfg.reweight)
        gp = gradient_penalty(self.critic, real, fake, cfg.gp_weight)
        loss = w_loss + gp + ct
        loss.backward()
        self.opt_critic.step()
        self.critic_steps += 1
        return {"critic_loss": loss.detach(), "gp": gp.detach(), "ct": ct.detach(),
                "wdist": (s_real.mean() - s_fake.mean()).detach()}, z

    def ratio_step(self, real: torch.Tensor) -> torch.Tensor:
        """One ratio-classifier update: BCE on ``real`` vs fresh fakes, grad-norm clip, step."""
        d = self.ratio_classifier
        self.opt_ratio.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = self.generator(self._latents(real.shape[0], real))
        loss = ratio_classifier_loss(d(real), d(fake))
        loss.backward()
        nn.utils.clip_grad_norm_(d.parameters(), self.config.max_grad_norm)
        self.opt_ratio.step()
        self.ratio_steps += 1
        return loss.detach()

    def generator_step(self, z: torch.Tensor, p_old: torch.Tensor | None) -> dict:
        """One generator update on the fixed latents ``z``: the clipped surrogate against the
        frozen ``p_old`` (``ppo_generator_loss``, computed from its two pieces so that r is at
        hand), or −mean f(G(z)) when ``p_old`` is None. One G forward feeds both the ratio
        classifier and the critic (the official code runs G twice on the same z: identical
        outputs unless G is stochastic; batch-norm running stats move once, not twice).

        Returns 0-d tensors: ``generator_loss``; with ``p_old`` also ``clipped_frac``, the share
        of samples with r > 1 + c (with the official max branch for A ≤ 0 exactly those get no
        gradient through r, whatever the sign of A ≠ 0), ``below_frac``, the share with
        r < 1 − c (never clipped: their gradient through A is scaled by r), and ``d_fake``, mean
        D(G(z))."""
        self.opt_g.zero_grad(set_to_none=True)
        with _frozen(self.critic, self.ratio_classifier):
            fake = self.generator(z)
            adv = critic_scores(self.critic(fake))
            if p_old is None:
                loss = -adv.mean()
            else:
                d_new = self.ratio_classifier(fake)
                ratio = probability_ratio(d_new, p_old)
                loss = -clipped_surrogate(ratio, adv, self.config.clip).mean()
            loss.backward()
        self.opt_g.step()
        self.generator_steps += 1
        out = {"generator_loss": loss.detach()}
        if p_old is not None:
            r = ratio.detach()
            out["clipped_frac"] = (r > 1.0 + self.config.clip).float().mean()
            out["below_frac"] = (r < 1.0 - self.config.clip).float().mean()
            out["d_fake"] = d_new.detach().mean()
        return out

    # -- the round --------------------------------------------------------------------------
    def train_step(self, batches: Iterator[torch.Tensor] | Callable[[], torch.Tensor]) -> dict:
        """One round: ``diters`` critic steps, then ``ppo_iters`` (ratio-classifier step +
        generator step) on the last critic step's latents. ``batches``: an iterator of real
        batches (B, ...) or a zero-argument callable returning one; a round takes
        diters + ppo_iters batches (diters without ratio clipping). Returns the last losses as
        Python floats (one host sync per round). Raises StopIteration when ``batches`` runs dry.
        """
        cfg = self.config
        nxt = batches if callable(batches) else (lambda: next(batches))
        for _ in range(cfg.diters):
            stats, z = self.critic_step(nxt())
        p_old = None
        if cfg.ratio_clip:
            with torch.no_grad():
                p_old = frozen_p_old(self.ratio_classifier(self.generator(z)))
        for _ in range(cfg.ppo_iters):
            if cfg.ratio_clip:
                stats["ratio_loss"] = self.ratio_step(nxt())
            stats.update(self.generator_step(z, p_old))
        self.rounds += 1
        return {k: float(v) for k, v in stats.items()}
