"""AWP as the paper's code does it (Wu, Xia, Wang, NeurIPS 2020; csdongxian/AWP AT_AWP/utils_awp.py),
line for line (docs/methods.md §4b (AWP (paper))): the oracle for the fused class.

The proxy model is kept: ``calc_awp`` loads the model's state into the proxy, takes one step of
``proxy_optim`` (plain SGD in the paper, lr 0.01) on the NEGATED loss, and returns, for every
state-dict entry whose name contains 'weight' and whose dim > 1, diff = ||w||/(||w' - w|| + 1e-20)
* (w' - w).  ``perturb(diff)`` adds gamma*diff to the model, ``restore(diff)`` subtracts it, AFTER
the optimizer step.  Train loop::

    x_adv = attack(model, x, y)
    diff = awp.calc_awp(x_adv, y); awp.perturb(diff)
    loss = F.cross_entropy(model(x_adv), y); opt.zero_grad(); loss.backward(); opt.step()
    awp.restore(diff)

Adaptation (the paper's call form is kept): ``calc_awp(closure=fn)`` takes the loss from
``fn(proxy)`` instead of cross-entropy of ``proxy(inputs_adv)`` (HF models, TRADES' loss).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F

EPS = 1e-20


def diff_in_weights(model, proxy) -> "OrderedDict[str, torch.Tensor]":
    """The paper's ``diff_in_weights``: name -> ||w||/(||w' - w|| + EPS) * (w' - w) for state-dict
    entries of dim > 1 whose name contains 'weight' (w from ``model``, w' from ``proxy``)."""
    diff_dict = OrderedDict()
    model_state_dict = model.state_dict()
    proxy_state_dict = proxy.state_dict()
    for (old_k, old_w), (new_k, new_w) in zip(model_state_dict.items(), proxy_state_dict.items()):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff_w = new_w - old_w
            diff_dict[old_k] = old_w.norm() / (diff_w.norm() + EPS) * diff_w
    return diff_dict


def add_into_weights(model, diff, coeff: float = 1.0) -> None:
    """The paper's ``add_into_weights``: ``param += coeff * diff[name]`` for every named parameter
    that has an entry in ``diff`` (in place, under no_grad)."""
    names_in_diff = diff.keys()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names_in_diff:
                param.add_(coeff * diff[name])


class AdvWeightPerturb:
    """``AdvWeightPerturb(model, proxy, proxy_optim, gamma)``: the paper's class.

    Args:
        model: the trained nn.Module (perturbed in place by ``perturb``).
        proxy: a second instance of the same architecture (its weights are overwritten).
        proxy_optim: an optimizer over ``proxy.parameters()`` (the paper: SGD, lr 0.01).
        gamma: the perturbation size (the paper: 0.01 for AT, 0.005 for TRADES).
    """

    def __init__(self, model, proxy, proxy_optim, gamma: float):
        """Stores the four arguments as attributes, like the paper's class; allocates nothing and
        raises nothing."""
        self.model = model
        self.proxy = proxy
        self.proxy_optim = proxy_optim
        self.gamma = gamma

    def calc_awp(self, inputs_adv=None, targets=None, *, closure: Callable | None = None):
        """The paper's ``calc_awp``: proxy <- model's state, proxy.train(), one ``proxy_optim`` step
        on -CE(proxy(inputs_adv), targets) (or on ``-closure(proxy)``), then :func:`diff_in_weights`.
        Returns the diff (OrderedDict name -> tensor).  The model is not changed."""
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()

        if closure is None:
            loss = -F.cross_entropy(self.proxy(inputs_adv), targets)
        else:
            loss = -closure(self.proxy)

        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()

        diff = diff_in_weights(self.model, self.proxy)
        return diff

    def perturb(self, diff) -> None:
        """model weights += gamma * diff."""
        add_into_weights(self.model, diff, coeff=1.0 * self.gamma)

    def restore(self, diff) -> None:
        """model weights -= gamma * diff (call it after the optimizer step, as the paper does)."""
        add_into_weights(self.model, diff, coeff=-1.0 * self.gamma)
