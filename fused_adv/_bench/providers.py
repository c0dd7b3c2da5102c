"""Who runs the bookkeeping, and what one timed "step" is for each method.

Providers (``PROVIDERS``), side by side in one run (docs/design.md §6 (Benchmarks)):
  reference  the community classes (fused_adv.reference), as practitioners paste them
  compile    torch.compile of the reference step (GPU only: on CPU it is not what anyone runs,
             and compiling every case costs minutes on 2 cores)
  foreach    the same math rewritten in torch._foreach_* ops, host-sync free
             (fused_adv._bench.foreach): the peer a PyTorch expert would write
  torch      fused_adv classes, backend='torch' (pure PyTorch foreach)
  cpp        fused_adv classes, backend='cpp' (the compiled CPU kernels)
  triton     fused_adv classes, backend='triton' (GPU only: the CPU interpreter is a test tool,
             not a benchmark)
  cuda       fused_adv classes, backend='cuda' (the compiled CUDA kernels)

One step = the bookkeeping of one training step, with the forward/backward left out:
  fgm, fgsm  attack(); restore()
  pgd3       backup_grad(); 3 x attack (the gradient of the "adversarial backward" between
             attacks is put in place by reference, which costs nothing); restore_grad(); restore()
  awp        attack_backward(x, y, mask, epoch=0) on :class:`~fused_adv._bench.shapes.ParamModel`,
             whose forward/backward is free and whose optimizer's zero_grad is a no-op: save,
             perturb, restore.
  mifgsm     PGD-3's step with MI-FGSM (steps=3): backup_grad, 3 attacks, restore_grad, restore.
  awp_paper  diff = calc_awp(closure=...); perturb(diff); restore(diff), the loss a stand-in whose
             forward is free and whose backward writes a copy of the clean gradients (as a real
             backward writes them): the reference loads the proxy, steps its SGD and forms the diff;
             the fused class (proxy=None) reduces and adds.
``reset()`` (untimed) puts the clean gradients back between steps.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch

from fused_adv._bench.shapes import NoOpOptimizer, ParamModel

PGD_K = 3


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "reference" | "compile" | "foreach" | "fused"
    backend: str | None = None
    description: str = ""

    def why_not(self, device: torch.device, method: str = "fgm") -> str | None:
        """None if this provider can run on ``device``, else the reason."""
        device = torch.device(device)
        if self.kind == "foreach" and method not in self.classes():
            return f"no torch._foreach_* rewrite of {method} (fused_adv._bench.foreach covers fgm/fgsm/pgd3/awp)"
        if self.kind in ("reference", "foreach"):
            return None
        if self.kind == "compile":
            if device.type != "cuda":
                return "torch.compile(reference) is benchmarked on GPU only"
            if method == "awp_paper":
                return "the paper's calc_awp (load_state_dict, a proxy optimizer step) is not compiled"
            return None
        if self.backend == "triton" and device.type != "cuda":
            return "triton serves CUDA tensors (the CPU interpreter is not a benchmark)"
        from fused_adv.ops import why_not
        op = {"awp": "awp_perturb_", "pgd3": "pgd_perturb_", "fgsm": "fgsm_perturb_", "mifgsm": "mifgsm_perturb_",
              "awp_paper": "awp_paper_add_"}.get(method, "fgm_perturb_")
        return why_not(self.backend, device, op)

    def classes(self):
        """``{method: constructor}`` for this provider."""
        import functools

        if self.kind in ("reference", "compile"):
            from fused_adv import reference as m
            return {"fgm": m.FGM, "fgsm": m.FGSM, "pgd3": m.PGD, "awp": m.AWP, "mifgsm": m.MIFGSM,
                    "awp_paper": m.AdvWeightPerturb}
        if self.kind == "foreach":
            from fused_adv._bench import foreach as m
            return {"fgm": m.FGM, "fgsm": m.FGSM, "pgd3": m.PGD, "awp": m.AWP}
        import fused_adv as m
        return {k: functools.partial(c, backend=self.backend)
                for k, c in {"fgm": m.FGM, "fgsm": m.FGSM, "pgd3": m.PGD, "awp": m.AWP, "mifgsm": m.MIFGSM,
                             "awp_paper": m.AdvWeightPerturb}.items()}


PROVIDERS: dict[str, Provider] = {p.name: p for p in [
    Provider("reference", "reference", None, "community classes (fused_adv.reference)"),
    Provider("compile", "compile", None, "torch.compile(community step)"),
    Provider("foreach", "foreach", None, "the community math in torch._foreach_* ops, host-sync free"),
    Provider("torch", "fused", "torch", "fused_adv, pure-PyTorch backend"),
    Provider("cpp", "fused", "cpp", "fused_adv, compiled CPU kernels"),
    Provider("triton", "fused", "triton", "fused_adv, Triton kernels"),
    Provider("cuda", "fused", "cuda", "fused_adv, compiled CUDA kernels"),
]}


def available(device: torch.device, method: str = "fgm", names=None) -> list[Provider]:
    """The providers among ``names`` (default: all) that can run ``method`` on ``device``."""
    names = list(PROVIDERS) if names is None else names
    return [PROVIDERS[n] for n in names if PROVIDERS[n].why_not(device, method) is None]


class _GivenGrads(torch.autograd.Function):
    """A loss with a free forward whose backward gives each parameter a copy of a given gradient
    (a real backward writes its gradients, hence the copy): the paper's AWP bookkeeping timed
    without a model's forward/backward."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, _):
        return (None, *[g.clone() for g in ctx.grads])


@dataclasses.dataclass
class Case:
    """One (method, provider) on one model: ``step()`` is timed, ``reset()`` is not."""
    adversary: object
    step: Callable[[], None]
    reset: Callable[[], None] | None
    held: list = dataclasses.field(default_factory=list)  # stand-in tensors (not adversary memory)


def build_case(method: str, provider: Provider, model: ParamModel) -> Case:
    """The adversary of ``provider`` for ``method`` on ``model`` and its step/reset closures."""
    cls = provider.classes()[method]
    clean = model.grads()
    reset = None
    held = []
    if method in ("fgm", "fgsm"):
        adv = cls(model)

        def step():
            adv.attack()
            adv.restore()
    elif method in ("pgd3", "mifgsm"):
        adv = cls(model) if method == "pgd3" else cls(model, epsilon=1.0, steps=PGD_K)
        emb = [p for n, p in model.named_parameters() if "word_embeddings" in n]
        # Stand-ins for the gradients the adversarial backward passes would produce.
        adv_grads = [[torch.randn_like(p).mul_(1e-3) for p in emb] for _ in range(PGD_K - 1)]
        held = [g for gs in adv_grads for g in gs]

        def step():
            adv.backup_grad()
            for t in range(PGD_K):
                adv.attack(is_first_attack=(t == 0))
                if t != PGD_K - 1:
                    for p, g in zip(emb, adv_grads[t]):  # zero_grad + backward, by reference
                        p.grad = g
                else:
                    adv.restore_grad()
            adv.restore()

        def reset():
            model.set_grads(clean)
    elif method == "awp":
        adv = cls(model, NoOpOptimizer())
        x = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)

        def step():
            adv.attack_backward(x, None, None, 0)
    elif method == "awp_paper":
        names = [n for n, p in model.named_parameters() if "weight" in n and p.dim() > 1]
        given = [clean[n] for n in names]
        if provider.kind == "fused":
            adv = cls(model, gamma=0.01)
        else:
            proxy = copy.deepcopy(model)
            for p in proxy.parameters():
                p.grad = None
            adv = cls(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.01), 0.01)

        def closure(m):
            named = dict(m.named_parameters())
            return _GivenGrads.apply(given, *[named[n] for n in names])

        def step():
            diff = adv.calc_awp(closure=closure)
            adv.perturb(diff)
            adv.restore(diff)
    else:
        raise ValueError(f"unknown method {method!r}")
    if provider.kind == "compile":
        from torch import _dynamo

        _dynamo.reset()
        step = torch.compile(step)
    return Case(adv, step, reset, held)
