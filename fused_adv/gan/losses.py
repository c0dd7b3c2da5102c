"""Reference losses of the GAN with probability-ratio clipping and sample reweighting.

docs/methods.md §9 (GAN with probability-ratio clipping) states the math; these functions are the
executable form, written the way the authors' CIFAR-10 training script computes each term
(Wu, Zhou, Wilson, Xing, Hu, NeurIPS 2020):

* the critic f is a WGAN-GP critic; its fake term is reweighted by W = B·softmax(f(fake)) over the
  batch, detached (self-normalised importance weights, mean of W is 1);
* a binary "ratio classifier" D (sigmoid output) estimates the density ratio of the current to
  the previous generator: before a round of generator steps, on fixed latents z,
  P0 = (1 − D0)/max(D0, 1e-7) with D0 = D(G_old(z));
* every generator step on the same z: r = (1 − D1)/max(D1·P0, 1e-7) with D1 = D(G(z)),
  A = f(G(z)), and the PPO-style clipped surrogate — min(rA, clip(r)A) where A > 0 (strict) and
  max(rA, clip(r)A) where A ≤ 0 (the official code's choice, not PPO's min everywhere).

Everything here is plain differentiable PyTorch with static shape checks only (no host reads),
so it traces under ``torch.compile(fullgraph=True)``. NaN inputs are not checked (a check would
cost a host sync per step): a NaN in any input makes the loss NaN (see each function).

Why there is no fused kernel: docs/methods.md §9 records the measurement (kernel counts and time
of these losses against the networks' forward/backward per step).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

#: the official code's floor under the denominators of P0 and r
RATIO_EPS = 1e-7


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        # (B, 1) against (B,) would broadcast to (B, B) and silently average the wrong thing
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def frozen_p_old(d0: torch.Tensor) -> torch.Tensor:
    """P0 = (1 − D0)/max(D0, 1e-7), detached: the odds of the frozen ratio classifier on the old
    generator's samples, computed once before a round of generator steps.

    ``d0``: D(G_old(z)) in [0, 1], any shape and floating dtype. Returns a new tensor of that
    shape without grad. D0 = 0 gives 1e7, D0 = 1 gives 0; NaN propagates.
    """
    d0 = d0.detach()
    return (1.0 - d0) / torch.clamp(d0, min=RATIO_EPS)


def probability_ratio(d_new: torch.Tensor, p_old: torch.Tensor) -> torch.Tensor:
    """r = (1 − D1)/max(D1·P0, 1e-7), the estimated p_new(x)/p_old(x) per sample.

    ``d_new`` = D(G(z)) (differentiable), ``p_old`` = ``frozen_p_old(D0)``; same shape. D1 = 1
    gives r = 0; D1·P0 below 1e-7 (D1 = 0, or P0 = 0) gives r = (1 − D1)·1e7, whose gradient
    w.r.t. D1 is −1e7 (the clamp passes no gradient to D1 there). Raises ValueError on a shape
    mismatch.
    """
    _check_same_shape(d_new=d_new, p_old=p_old)
    return (1.0 - d_new) / torch.clamp(d_new * p_old, min=RATIO_EPS)


def clipped_surrogate(ratio: torch.Tensor, advantage: torch.Tensor, clip: float = 0.4) -> torch.Tensor:
    """The per-sample target: where A > 0, min(rA, clamp(r, 1−c, 1+c)A); elsewhere (A ≤ 0, and
    NaN) max(rA, clamp(r, 1−c, 1+c)A). Same shape as the inputs; NaN in r or A gives NaN there.

    Gradients follow torch's conventions for min/max (a tie splits the gradient in halves) and
    clamp (the gradient passes at the clip edges themselves), which is what the official code
    gets from autograd.
    """
    _check_same_shape(ratio=ratio, advantage=advantage)
    surr1 = ratio * advantage
    surr2 = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantage
    return torch.where(advantage > 0, torch.min(surr1, surr2), torch.max(surr1, surr2))


def ppo_generator_loss(d_new: torch.Tensor, p_old: torch.Tensor, advantage: torch.Tensor,
                       clip: float = 0.4) -> torch.Tensor:
    """The generator loss with probability-ratio clipping: −mean(target) (docs/methods.md §9).

    Args:
        d_new: D(G(z)) in [0, 1] from the ratio classifier, differentiable, shape (B, 1) or (B,).
        p_old: ``frozen_p_old(D(G_old(z)))`` on the same z, same shape (no grad needed).
        advantage: the critic's scores f(G(z)), differentiable, same shape.
        clip: c in clamp(r, 1 − c, 1 + c); the official value is 0.4. Must be in [0, 1).

    Returns a 0-d tensor; backward reaches G through both ``d_new`` and ``advantage``. NaN in
    any input propagates to the loss. Raises ValueError on mismatched shapes or a bad ``clip``.
    """
    if not 0.0 <= float(clip) < 1.0:
        raise ValueError(f"clip must be in [0, 1), got {clip}")
    _check_same_shape(d_new=d_new, p_old=p_old, advantage=advantage)
    return -clipped_surrogate(probability_ratio(d_new, p_old), advantage, clip).mean()


def importance_weights(fake_scores: torch.Tensor) -> torch.Tensor:
    """W = B·softmax(f(fake), dim=0), detached: the self-normalised importance weights of the
    fake samples (mean 1 over the batch; softmax subtracts the max first, so large scores do not
    overflow). A NaN score makes every weight NaN."""
    if fake_scores.dim() == 0 or fake_scores.shape[0] == 0:
        raise ValueError(f"fake_scores needs a non-empty batch dimension, got shape {tuple(fake_scores.shape)}")
    s = fake_scores.detach()
    return s.shape[0] * F.softmax(s, dim=0)


def reweighted_fake_term(fake_scores: torch.Tensor) -> torch.Tensor:
    """mean(W·f(fake)) with W = ``importance_weights(fake_scores)`` (detached): the critic's fake
    term with sample reweighting; the critic loss is −mean f(real) + this + GP.

    ``fake_scores``: the critic's scores on G(z).detach(), shape (B, 1) or (B,). Returns a 0-d
    tensor whose gradient w.r.t. each score is W_i / numel. NaN propagates.
    """
    return (importance_weights(fake_scores) * fake_scores).mean()


def ratio_classifier_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """BCE(D(real), 1) + BCE(D(G(z').detach()), 0): the ratio classifier's loss on a real batch
    and fresh fakes (the official code backpropagates the two terms one after the other; the sum
    has the same gradient). Inputs are probabilities in [0, 1] (BCE clamps log at −100, so
    saturated outputs give a finite loss of 100 per sample); ValueError outside [0, 1] comes from
    torch's binary_cross_entropy on CPU."""
    return (F.binary_cross_entropy(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake)))


def critic_scores(out) -> torch.Tensor:
    """The score from a critic's output: the tensor itself, or the first element of a
    (score, features) tuple (the official critic returns both)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def gradient_penalty(critic: Callable, real: torch.Tensor, fake: torch.Tensor, weight: float = 5.0,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP: weight·mean_i (‖∇_x f(x̂_i)‖₂ − 1)², x̂ = α·real + (1 − α)·fake, one α ~ U(0, 1)
    per sample (official weight 5).

    ``real``/``fake``: (B, ...) with the same shape; ``fake`` is detached here. ``alpha``: (B,)
    to fix the interpolation (tests); drawn with torch.rand otherwise (consumes the global RNG).
    The graph is kept (create_graph) so the penalty trains the critic. Raises ValueError on a
    shape mismatch.
    """
    _check_same_shape(real=real, fake=fake)
    b = real.shape[0]
    if alpha is None:
        alpha = torch.rand(b, device=real.device, dtype=real.dtype)
    alpha = alpha.reshape((b,) + (1,) * (real.dim() - 1))
    x = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    score = critic_scores(critic(x))
    (grad,) = torch.autograd.grad(score, x, grad_outputs=torch.ones_like(score), create_graph=True)
    return ((grad.reshape(b, -1).norm(2, dim=1) - 1) ** 2).mean() * weight


def consistency_term(score1: torch.Tensor, score2: torch.Tensor, feat1: torch.Tensor, feat2: torch.Tensor,
                     weight: float = 2.0, factor_m: float = 0.0) -> torch.Tensor:
    """The consistency term (CT-GAN) on two stochastic (dropout) critic passes over the same real
    batch, as the official code computes it:

        ct = weight·(s1 − s2)² + 0.1·weight·mean_k (h1 − h2)²,   mean(max(0, ct − M))

    with s the scores, shape (B, 1), and h the penultimate features, shape (B, K). The official
    code adds the (B, 1) score term to the (B,) feature term, which broadcasts to (B, B); this
    function keeps that: with the official M = 0 every entry is ≥ 0, max is a no-op and the
    result equals mean(score term) + mean(feature term); with M > 0 the (B, B) pairing matters.
    Scores of shape (B,) are viewed as (B, 1). NaN propagates.
    """
    if score1.shape != score2.shape or feat1.shape != feat2.shape:
        raise ValueError(f"score shapes {tuple(score1.shape)} vs {tuple(score2.shape)}, "
                         f"feature shapes {tuple(feat1.shape)} vs {tuple(feat2.shape)}")
    b = score1.shape[0]
    s_term = weight * (score1.reshape(b, 1) - score2.reshape(b, 1)) ** 2
    f_term = weight * 0.1 * ((feat1.reshape(b, -1) - feat2.reshape(b, -1)) ** 2).mean(dim=1)
    ct = s_term + f_term
    ct = torch.clamp(ct - factor_m, min=0.0)  # max(0·(ct − M), ct − M) for finite ct
    return ct.mean()


def wgan_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, reweight: bool = True) -> torch.Tensor:
    """−mean f(real) + (mean(W·f(fake)) if ``reweight`` else mean f(fake)): the critic's
    Wasserstein terms without the penalties."""
    fake_term = reweighted_fake_term(fake_scores) if reweight else fake_scores.mean()
    return fake_term - real_scores.mean()
