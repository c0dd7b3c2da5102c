"""GAN training with probability-ratio clipping and sample reweighting (Wu, Zhou, Wilson, Xing,
Hu, NeurIPS 2020); docs/methods.md §9 (GAN with probability-ratio clipping).

    from fused_adv.gan import PPOGAN, PPOGANConfig, make_optimizers
    cfg = PPOGANConfig(nz=32)                       # official schedule: Diters 5, PPO_iters 5, clip 0.4
    opt_g, opt_c, opt_d = make_optimizers(G, critic, D, cfg)
    gan = PPOGAN(G, critic, D, opt_g, opt_c, opt_d, cfg)
    for _ in range(rounds):
        stats = gan.train_step(real_batches)        # iterator of real batches

The losses on their own: ``ppo_generator_loss``, ``reweighted_fake_term``,
``ratio_classifier_loss``, ``gradient_penalty``, ``consistency_term``. ``python -m
fused_adv.gan.demo`` (``fused-adv gan-demo``) compares plain WGAN-GP against this on scikit-learn's
digits.
"""
from fused_adv.gan.losses import (RATIO_EPS, clipped_surrogate, consistency_term, critic_scores,
                                  frozen_p_old, gradient_penalty, importance_weights, ppo_generator_loss,
                                  probability_ratio, ratio_classifier_loss, reweighted_fake_term,
                                  wgan_critic_loss)
from fused_adv.gan.train import PPOGAN, PPOGANConfig, make_optimizers

__all__ = ["PPOGAN", "PPOGANConfig", "make_optimizers", "ppo_generator_loss", "reweighted_fake_term",
           "importance_weights", "ratio_classifier_loss", "gradient_penalty", "consistency_term",
           "wgan_critic_loss", "probability_ratio", "clipped_surrogate", "frozen_p_old", "critic_scores",
           "RATIO_EPS"]
