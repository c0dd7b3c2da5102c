"""Per-rank scenarios for tests/test_deepspeed.py: 2 CPU processes, DeepSpeed engines at ZeRO
stages 0-3 on a tiny BERT, each rank 4 of the 8 examples of the global batch.

Each scenario runs on both ranks (the same collectives in the same order) and compares against
an unsharded single-process run of the same method on the 8-example global batch, computed in
the same process (so the oracle needs no communication).  Failures are collected, not raised
mid-scenario; a scenario that fails on one rank only could leave the other waiting in a
collective, so the parent test has a timeout.  Each rank writes {scenario: "ok" | traceback}
to <out>/rank<r>.json.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import tiny_bert_cls  # noqa: E402

RTOL = 1e-5
# Relative to max|oracle| of each tensor, but at least this: BERT's key biases start at 0 and
# their exact gradient is 0 (a bias on every key shifts all scores of a query equally), so they
# hold only rounding noise (~1e-9) whose relative difference means nothing.  Every other tensor
# of the tiny BERT is far above it (weights ~2e-2, LayerNorm ~1).
SCALE_FLOOR = 1e-2
STEPS = 3
LR = 0.5
EMB = "word_embeddings"
# ZeRO-3 persistence threshold: parameters below it stay gathered (replicated path), the others
# are partitioned (reduction path); 300 splits the tiny BERT between both (word/position
# embeddings and the intermediate/output dense layers partitioned; LayerNorms, biases, the
# 16x16 attention weights and the classifier persistent).
Z3_PERSIST = 300


def ds_config(stage: int, top: dict | None = None, **zero) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage, **zero}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
           "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 by default; the unsharded run does not clip
    if stage == 3:
        cfg["zero_optimization"].setdefault("stage3_param_persistence_threshold", Z3_PERSIST)
    cfg.update(top or {})
    return cfg


def make_engine(stage: int, top: dict | None = None, **zero):
    import deepspeed
    model = tiny_bert_cls(num_labels=3, vocab=64, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, top, **zero))
    return engine


_SHARED: dict[int, object] = {}


def shared_engine(stage: int):
    """One engine per stage for the checks that need no fresh weights, in SCENARIOS order:
    no_grad_error (before any backward), two_backwards (two backwards, no step), layout,
    restore_exact (ends with engine.step()), and at ZeRO-2 opt_refusals: an engine build saved
    per check (they cost more than the checks)."""
    if stage not in _SHARED:
        _SHARED[stage] = make_engine(stage)
    return _SHARED[stage]


def global_batch(step: int, n: int = 8, length: int = 8):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 64, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, -3:] = 0
    labels = torch.randint(0, 3, (n,), generator=g)
    return ids, mask, labels


def local_batch(step: int, rank: int, world: int):
    ids, mask, labels = global_batch(step)
    k = ids.shape[0] // world
    sl = slice(rank * k, (rank + 1) * k)
    return ids[sl], mask[sl], labels[sl]


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's module, whole (fp32 master at ZeRO>0), same on all ranks."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    out = {}
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                lp = p.detach().clone()
            hp = safe_get_full_fp32_param(p)
            assert torch.equal(lp, hp.to(lp.dtype)), f"{name}: model weights differ from the fp32 master"
            out[name] = hp.clone()
        else:
            hp = safe_get_full_fp32_param(p)
            out[name] = (p.detach() if hp is None else hp).clone()
    return out


def local_pieces(engine) -> dict[str, list[torch.Tensor]]:
    """What this rank holds of every parameter: ``param.data`` (the whole weight at ZeRO-0/1/2; at
    ZeRO-3 the gathered copy of a persistent parameter, else empty) and, at ZeRO-3, the partition
    ``ds_tensor`` that the next gather reads."""
    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = [p.detach().clone()] + ([p.ds_tensor.detach().clone()] if hasattr(p, "ds_id") else [])
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Equal pieces; a ZeRO-3 gathered copy is compared only when both sides hold one (whether a
    partitioned weight is gathered at a given moment is DeepSpeed's business; the forward-loss
    checks cover what it computes with)."""
    if len(a) == 2 and (a[0].numel() == 0) != (b[0].numel() == 0):
        a, b = a[1:], b[1:]
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def check_close(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for k in want:
        a, b = got[k].double(), want[k].double()
        diff = (a - b).abs().max().item()
        err = diff / max(b.abs().max().item(), SCALE_FLOOR)
        assert err <= RTOL, f"{what}: {k} differs by {err:.3g} relative (> {RTOL}; max abs {diff:.3g})"


# --------------------------------------------------------------------------- the training loops
def loss_of(model, batch):
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def step_fgm(model, backward, attacker, batch, zero_grad):
    backward(loss_of(model, batch))
    attacker.attack()
    backward(loss_of(model, batch))
    attacker.restore()


def step_pgd(model, backward, attacker, batch, zero_grad, K=3):
    backward(loss_of(model, batch))
    attacker.backup_grad()
    for t in range(K):
        attacker.attack(is_first_attack=(t == 0))
        if t != K - 1:
            zero_grad()
        else:
            attacker.restore_grad()
        backward(loss_of(model, batch))
    attacker.restore()


def step_awp(model, backward, attacker, batch, zero_grad):
    backward(loss_of(model, batch))
    ids, mask, labels = batch
    attacker.attack_backward(ids, labels, mask, epoch=1)


LOOPS = {"fgm": step_fgm, "fgsm": step_fgm, "pgd": step_pgd, "awp": step_awp, "mifgsm": step_pgd}


# SAM and the paper's AWP own the optimizer step; their loops take (model, backward, method,
# batch, step) with step() the base step (opt.step() unsharded, engine.step() under DeepSpeed).
def step_sam(model, backward, sam, batch, step):
    backward(loss_of(model, batch))
    sam.first_step(zero_grad=True)
    backward(loss_of(model, batch))
    sam.second_step(zero_grad=True)


def step_awp_paper(model, backward, awp, batch, step):
    diff = awp.calc_awp(closure=lambda m: loss_of(m, batch))
    awp.perturb(diff)
    backward(loss_of(model, batch))
    step()
    awp.restore(diff)


OPT_LOOPS = {"sam": step_sam, "awp_paper": step_awp_paper}


def make_attacker(cls_name: str, fused: bool, model, optimizer):
    import fused_adv
    import fused_adv.reference as ref
    mod = fused_adv if fused else ref
    if cls_name == "fgm":
        return mod.FGM(model, emb_name=EMB, epsilon=0.5)
    if cls_name == "fgsm":
        return mod.FGSM(model, emb_name=EMB, epsilon=0.01)
    if cls_name == "pgd":
        return mod.PGD(model, epsilon=0.5, alpha=0.2, emb_name=EMB)
    if cls_name == "awp":
        return mod.AWP(model, optimizer, adv_param="weight", adv_lr=0.5, adv_eps=0.01, start_epoch=0,
                       autocast=False)
    if cls_name == "mifgsm":
        return mod.MIFGSM(model, epsilon=0.5, steps=3, decay=0.9, emb_name=EMB)
    raise KeyError(cls_name)


def make_opt_method(name: str, fused: bool, model, engine=None):
    """(method, base step) for SAM / the paper's AWP: unsharded on ``model`` with torch SGD (the
    paper's AWP unsharded is the fused class with proxy=None, which tests/test_awp_paper.py ties to
    the paper's proxy class), or under DeepSpeed on ``engine``."""
    import fused_adv
    import fused_adv.reference as ref
    if name == "sam":
        if engine is not None:
            return fused_adv.SAM.from_engine(engine, rho=0.05), engine.step
        sam = (fused_adv if fused else ref).SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR)
        return sam, None
    if name == "awp_paper":
        target = engine if engine is not None else model
        awp = fused_adv.AdvWeightPerturb(target, gamma=0.05, proxy_lr=0.1)
        if engine is not None:
            return awp, engine.step
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        return awp, lambda: (opt.step(), opt.zero_grad())
    raise KeyError(name)


def unsharded_run(method: str) -> dict[str, torch.Tensor]:
    """The reference classes on a plain single-process model, the 8-example global batch."""
    model = tiny_bert_cls(num_labels=3, vocab=64, hidden=16)
    if method in OPT_LOOPS:
        meth, step = make_opt_method(method, False, model)
        for k in range(STEPS):
            OPT_LOOPS[method](model, lambda l: l.backward(), meth, global_batch(k), step)
        return {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    attacker = make_attacker(method, False, model, opt)
    for step in range(STEPS):
        LOOPS[method](model, lambda l: l.backward(), attacker, global_batch(step), model.zero_grad)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


_ORACLE: dict[str, dict] = {}


def oracle(method: str):
    if method not in _ORACLE:
        _ORACLE[method] = unsharded_run(method)
    return _ORACLE[method]


def deepspeed_run(stage: int, method: str, rank: int, world: int, *, via_module: bool = False, **zero):
    engine = make_engine(stage, **zero)
    if method in OPT_LOOPS:
        meth, step = make_opt_method(method, True, None, engine)
        for k in range(STEPS):
            OPT_LOOPS[method](engine, engine.backward, meth, local_batch(k, rank, world), step)
        return engine
    target = engine.module if via_module else engine
    attacker = make_attacker(method, True, target, engine.optimizer)
    for step in range(STEPS):
        LOOPS[method](engine, engine.backward, attacker, local_batch(step, rank, world), engine.zero_grad)
        engine.step()
    return engine


# ------------------------------------------------------------------------------------ scenarios
def scenario_matrix(stage: int, method: str):
    def run(rank, world):
        engine = deepspeed_run(stage, method, rank, world)
        check_close(full_params(engine), oracle(method), f"ZeRO-{stage} {method}")
    return run


def scenario_engine_module(stage: int):
    """FGM(engine.module) and AWP(engine.module, engine.optimizer) find ZeRO's gradients too (AWP
    back-propagates with plain loss.backward() then: DeepSpeed's hooks still reduce)."""
    def run(rank, world):
        engine = deepspeed_run(stage, "fgm", rank, world, via_module=True)
        check_close(full_params(engine), oracle("fgm"), f"ZeRO-{stage} FGM(engine.module)")
    return run


def scenario_restore_exact(stage: int):
    """attack() changes what the next forward computes with, on EVERY rank, and only the chosen
    weights; restore() puts every piece back bit for bit (the forward loss too)."""
    def run(rank, world):
        import fused_adv
        engine = shared_engine(stage)
        batch = local_batch(0, rank, world)
        engine.backward(loss_of(engine, batch))
        probe = local_batch(1, rank, world)
        with torch.no_grad():
            loss0 = loss_of(engine, probe)  # a forward first: it settles which ZeRO-3 weights stay gathered
        for att in (fused_adv.FGM(engine, emb_name=EMB), fused_adv.AWP(engine, engine.optimizer, adv_eps=0.01)):
            awp = isinstance(att, fused_adv.AWP)
            before = local_pieces(engine)
            att.attack_step(first=True) if awp else att.attack()
            moved = {k for k, v in local_pieces(engine).items() if not same(v, before[k])}
            chosen = {k for k in before if ("weight" in k if awp else EMB in k)}
            assert moved and moved <= chosen, f"ZeRO-{stage} {type(att).__name__}: moved {sorted(moved)}"
            with torch.no_grad():
                loss1 = loss_of(engine, probe)
            assert not torch.equal(loss1, loss0), f"ZeRO-{stage}: the forward does not see the perturbation"
            att.restore()
            after = local_pieces(engine)
            assert all(same(after[k], before[k]) for k in before), f"ZeRO-{stage}: restore not bit-exact"
            with torch.no_grad():
                assert torch.equal(loss_of(engine, probe), loss0), f"ZeRO-{stage}: forward after restore differs"
        engine.step()
    return run


def gathered(engine) -> dict[str, torch.Tensor]:
    """The weights a forward computes with (gathered at ZeRO-3), not the fp32 master."""
    import deepspeed
    out = {}
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().clone()
        else:
            out[name] = p.detach().clone()
    return out


def scenario_two_backwards(stage: int):
    """Pins what two engine.backward calls before one engine.step do (gradient_accumulation_steps=1):
    ZeRO-0 and ZeRO-3 add the second gradient to the first, ZeRO-1 and ZeRO-2 replace it.  The
    methods' bookkeeping (fused_adv.sharding_deepspeed.GradStore) is built on exactly this."""
    def run(rank, world):
        from deepspeed.utils import safe_get_full_grad
        from fused_adv.sharding_deepspeed import DeepSpeedLayout
        engine = shared_engine(stage)  # fresh weights, no gradients yet (no_grad_error ran first)
        name = f"bert.embeddings.{EMB}.weight"
        p = dict(engine.module.named_parameters())[name]
        engine.backward(loss_of(engine, local_batch(0, rank, world)))
        g0 = safe_get_full_grad(p).clone()
        engine.backward(loss_of(engine, local_batch(1, rank, world)))
        g01 = safe_get_full_grad(p).clone()
        # each batch's gradient alone at the same weights: the unsharded model on the global batch
        plain = tiny_bert_cls(num_labels=3, vocab=64, hidden=16)
        want = []
        for k in (0, 1):
            plain.zero_grad()
            loss_of(plain, global_batch(k)).backward()
            want.append(dict(plain.named_parameters())[name].grad.clone())
        assert torch.allclose(g0, want[0], rtol=1e-5, atol=1e-9), "first backward's gradient"
        g1 = want[1]
        accumulates = torch.allclose(g01, g0 + g1, rtol=1e-5, atol=1e-9)
        replaces = torch.allclose(g01, g1, rtol=1e-5, atol=1e-9)
        assert accumulates != replaces, "neither adds nor replaces"
        assert accumulates == (stage in (0, 3)), f"ZeRO-{stage}: accumulates={accumulates}"
        assert DeepSpeedLayout(engine).accumulates == accumulates
    return run


def scenario_layout(stage: int):
    """DeepSpeedLayout.localize: the reduced per-tensor sums of squares of the local gradient
    pieces equal those of DeepSpeed's own full gradients (safe_get_full_grad), and of the local
    parameter pieces those of the gathered weights, for every parameter; one all_reduce per
    phase at most (plus the flat one that rebuilds replicated parameters' gradients); the
    local pieces share storage with what the next forward reads."""
    def run(rank, world):
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_grad
        from fused_adv import ops
        from fused_adv.sharding_deepspeed import DeepSpeedLayout
        engine = shared_engine(stage)  # holds the gradients of two_backwards' two backwards
        names, params = zip(*engine.module.named_parameters())
        full_g = [safe_get_full_grad(p).double() for p in params]
        full_p = gathered(engine)
        if stage == 3:
            # a forward under no_grad leaves every weight gathered: persistent ones are then taken
            # whole (gradients rebuilt), the others are released and taken as partitions
            with torch.no_grad():
                loss_of(engine, local_batch(1, rank, world))
            assert any(getattr(p, "ds_persist", False) and p.data.numel() for p in params)
            assert any(not getattr(p, "ds_persist", False) and p.data.numel() for p in params)
        layout = DeepSpeedLayout(engine)
        calls = []
        original = dist.all_reduce

        def counting(tensor, *a, **k):
            calls.append(tuple(tensor.shape))
            return original(tensor, *a, **k)

        dist.all_reduce = counting
        try:
            loc = layout.localize(params, names=names)
            n_rebuild = len(calls)
            sumsq = loc.reduce(ops.multi_tensor_sumsq(loc.grads + loc.params, backend="torch").view(2, -1), dim=1)
        finally:
            dist.all_reduce = original
        assert n_rebuild == (0 if stage == 0 else 1), f"rebuild collectives: {calls}"
        assert len(calls) - n_rebuild == (1 if stage == 3 else 0), f"reduction collectives: {calls}"
        assert loc.live == list(range(len(params))) or stage == 3, loc.live
        if stage == 3:
            assert all(p.data.numel() == 0 for p in params if not getattr(p, "ds_persist", False)), "not released"
        for j, i in enumerate(loc.live):
            want_g = full_g[i].pow(2).sum().item()
            want_p = full_p[names[i]].double().pow(2).sum().item()
            assert abs(sumsq[0, j].item() - want_g) <= 1e-5 * max(want_g, 1e-20), (names[i], sumsq[0, j], want_g)
            assert abs(sumsq[1, j].item() - want_p) <= 1e-5 * want_p, (names[i], sumsq[1, j], want_p)
    return run


def scenario_no_grad_error(stage: int):
    """An attack before any backward (or after step) raises, naming the causes."""
    def run(rank, world):
        from fused_adv.sharding_deepspeed import DeepSpeedLayout
        import fused_adv
        engine = shared_engine(stage)  # built here: no backward yet
        assert not DeepSpeedLayout(engine).has_grads()
        for make in (lambda: fused_adv.FGM(engine, emb_name=EMB), lambda: fused_adv.PGD(engine, emb_name=EMB),
                     lambda: fused_adv.MIFGSM(engine, emb_name=EMB)):
            att = make()
            try:
                if isinstance(att, fused_adv.PGD):  # MIFGSM too
                    att.attack(is_first_attack=True)
                else:
                    att.attack()
            except ValueError as e:
                assert "backward" in str(e), str(e)
            else:
                raise AssertionError(f"ZeRO-{stage}: {type(att).__name__}.attack() before backward did not raise")
            assert not att.is_attacked
        awp = fused_adv.AWP(engine, engine.optimizer)
        try:
            awp.attack_step(first=True)
        except ValueError as e:
            assert "backward" in str(e), str(e)
        else:
            raise AssertionError(f"ZeRO-{stage}: AWP.attack_step before backward did not raise")
        sam = fused_adv.SAM.from_engine(engine)
        try:
            sam.first_step(zero_grad=True)
        except ValueError as e:
            assert "backward" in str(e), str(e)
        else:
            raise AssertionError(f"ZeRO-{stage}: SAM.first_step before backward did not raise")
        assert not sam.is_perturbed
    return run


def scenario_ga_not_boundary(stage: int):
    """gradient_accumulation_steps=2 at ZeRO-1/2: after the first micro-batch's backward (not an
    accumulation boundary) the gradients are not reduced yet; an attack raises, saying so."""
    def run(rank, world):
        import fused_adv
        from fused_adv.sharding import ShardingError
        engine = make_engine(stage, {"gradient_accumulation_steps": 2})
        engine.backward(loss_of(engine, local_batch(0, rank, world)))
        try:
            fused_adv.FGM(engine, emb_name=EMB).attack()
        except ShardingError as e:
            assert "gradient_accumulation_steps" in str(e) and f"ZeRO-{stage}" in str(e), str(e)
        else:
            raise AssertionError(f"ZeRO-{stage}: attack on a non-boundary micro-batch did not raise")
    return run


def scenario_opt_refusals(stage: int):
    """What SAM and the paper's AWP refuse under DeepSpeed, each naming the stage and what works:
    SAM(model=engine) (use SAM.from_engine), SAM.first_step(zero_grad=False) at ZeRO-1/2 (the next
    engine.backward replaces the gradients), AdvWeightPerturb with a proxy (its step would see
    this rank's batch only), AdvWeightPerturb(engine.module) (restore must see engine.step)."""
    def run(rank, world):
        import fused_adv
        from fused_adv.sharding import ShardingError
        engine = shared_engine(stage)  # after restore_exact's step: no gradients

        def raises(fn, exc, *words):
            try:
                fn()
            except exc as e:
                assert all(w in str(e) for w in words), str(e)
            else:
                raise AssertionError(f"ZeRO-{stage}: did not raise {exc.__name__} ({words})")

        raises(lambda: fused_adv.SAM(engine.module.parameters(), torch.optim.SGD, lr=0.1, model=engine),
               ValueError, "SAM.from_engine")
        proxy = tiny_bert_cls(num_labels=3, vocab=64, hidden=16)
        raises(lambda: fused_adv.AdvWeightPerturb(engine, proxy, torch.optim.SGD(proxy.parameters(), lr=0.1)),
               ShardingError, f"ZeRO-{stage}", "proxy=None")
        raises(lambda: fused_adv.AdvWeightPerturb(engine.module), ShardingError, f"ZeRO-{stage}",
               "AdvWeightPerturb(engine)")
        sam = fused_adv.SAM.from_engine(engine)
        engine.backward(loss_of(engine, local_batch(0, rank, world)))
        raises(lambda: sam.first_step(zero_grad=False), ShardingError, f"ZeRO-{stage}", "zero_grad=True")
        assert not sam.is_perturbed
        engine.step()
    return run


def scenario_hf_trainer_refused(rank, world):
    """HF Trainer with TrainingArguments(deepspeed=...): accelerate (1.15) DOES set DeepSpeed up on
    CPU with gloo ranks (the Trainer's model becomes a DeepSpeedEngine with a ZeRO optimizer), but
    its backward is engine.backward + engine.step(), so the optimizer would step between the clean
    and the adversarial pass; the mixin refuses with NotImplementedError before any pass, naming
    the cause and the plain engine loop (pinned here, with the weights untouched)."""
    import tempfile
    from transformers import Trainer, TrainingArguments
    from fused_adv.integrations.hf import AdversarialTrainerMixin

    class AdvTrainer(AdversarialTrainerMixin, Trainer):
        pass

    model = tiny_bert_cls(num_labels=3, vocab=64, hidden=16)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = ds_config(2)
    ids, mask, labels = local_batch(0, rank, world)
    data = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(ids.shape[0])]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=1, deepspeed=cfg,
                                 use_cpu=True, report_to=[], save_strategy="no", ddp_backend="gloo",
                                 max_grad_norm=0.0, learning_rate=LR, lr_scheduler_type="constant", optim="sgd",
                                 disable_tqdm=True)
        trainer = AdvTrainer(model=model, args=args, train_dataset=data, adversarial="fgm",
                             adversarial_kwargs={"emb_name": EMB})
        assert trainer.is_deepspeed_enabled, "accelerate did not enable DeepSpeed"
        try:
            trainer.train()
        except NotImplementedError as e:
            assert "deepspeed=" in str(e) and "engine.step()" in str(e) and "FGM(engine)" in str(e), str(e)
        else:
            raise AssertionError("the mixin ran under TrainingArguments(deepspeed=...)")
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine", type(trainer.model_wrapped)
    after = full_params(trainer.model_wrapped)
    check_close(after, before, "weights after the refused HF step")


def scenario_offload_refused(rank, world):
    import fused_adv
    from fused_adv.sharding import ShardingError
    engine = make_engine(3, {"zero_force_ds_cpu_optimizer": False},
                         offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
    try:
        fused_adv.FGM(engine, emb_name=EMB)
        engine.backward(loss_of(engine, local_batch(0, rank, world)))
        fused_adv.FGM(engine, emb_name=EMB).attack()
    except ShardingError as e:
        assert "ZeRO-3" in str(e) and "offload" in str(e), str(e)
    else:
        raise AssertionError("ZeRO-3 offload was not refused")


# ------------------------------------------------------------- activation-space methods, ZeRO-3
@contextlib.contextmanager
def fixed_noise(rank: int, world: int):
    """SMART and SiFT draw their initial noise with ``Tensor.normal_`` on a [B, L, H] tensor; the
    unsharded run draws it for 8 examples, each rank for its 4, so the streams differ.  Inside
    this block such a draw takes its rows from one fixed [8, L, H] tensor (rank r gets rows
    4r..4r+3, the unsharded run all 8): the same noise per example on both sides."""
    original = torch.Tensor.normal_
    n_global = global_batch(0)[0].shape[0]
    table = {}

    def normal_(self, mean=0.0, std=1.0, *, generator=None):
        if self.dim() == 3 and self.shape[0] in (n_global, n_global // world):
            key = tuple(self.shape[1:])
            if key not in table:
                g = torch.Generator().manual_seed(7)
                table[key] = torch.randn((n_global, *key), generator=g)
            rows = table[key] if self.shape[0] == n_global else \
                table[key][rank * self.shape[0]:(rank + 1) * self.shape[0]]
            with torch.no_grad():
                self.copy_(rows * std + mean)
            return self
        return original(self, mean, std, generator=generator)

    torch.Tensor.normal_ = normal_
    try:
        yield
    finally:
        torch.Tensor.normal_ = original


def activation_step(method: str, model, backward, batch):
    """One training step's gradients with FreeLB / SMART / SiFT (fused classes)."""
    import fused_adv
    ids, mask, labels = batch
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if method == "freelb":
        fused_adv.FreeLB(adv_K=2, adv_lr=0.1, adv_init_mag=0.0).attack(model, kwargs)
    elif method == "smart":
        out = model(**kwargs)
        backward(out.loss + fused_adv.SMART(adv_alpha=1.0, noise_var=0.1, step_size=0.1).loss(
            model, dict(input_ids=ids, attention_mask=mask), out.logits))
    elif method == "sift":
        from fused_adv.sift import AdversarialLearner, hook_sift_layer
        module = getattr(model, "module", model)
        if not hasattr(module, "_sift_modules"):
            module._sift_modules = hook_sift_layer(module, hidden_size=16, learning_rate=0.1,
                                                   init_perturbation=0.1)
        adv = AdversarialLearner(module, module._sift_modules)
        out = model(**kwargs)
        term = adv.loss(out.logits, lambda m, **b: model(**b).logits, input_ids=ids, attention_mask=mask)
        backward(out.loss + term)
    else:
        raise KeyError(method)


def scenario_activation_z3(method: str):
    """FreeLB / SMART / SiFT on a ZeRO-3 engine (parameters partitioned, some persistent) train
    as the same method on an unsharded model on the global batch (same noise per example)."""
    def run(rank, world):
        model = tiny_bert_cls(num_labels=3, vocab=64, hidden=16)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with fixed_noise(rank, world):
            for step in range(STEPS):
                activation_step(method, model, lambda l: l.backward(), global_batch(step))
                opt.step()
                opt.zero_grad()
            want = {k: v.detach().clone() for k, v in model.named_parameters()}
            engine = make_engine(3)
            for step in range(STEPS):
                activation_step(method, engine, engine.backward, local_batch(step, rank, world))
                engine.step()
        check_close(full_params(engine), want, f"ZeRO-3 {method}")
    return run


SCENARIOS = {}
for _stage in (0, 1, 2, 3):
    for _m in ("fgm", "fgsm", "pgd", "awp", "mifgsm", "sam", "awp_paper"):
        SCENARIOS[f"z{_stage}_{_m}"] = scenario_matrix(_stage, _m)
    # in this order on one shared engine per stage (see shared_engine)
    SCENARIOS[f"z{_stage}_no_grad_error"] = scenario_no_grad_error(_stage)
    SCENARIOS[f"z{_stage}_two_backwards"] = scenario_two_backwards(_stage)
    SCENARIOS[f"z{_stage}_layout"] = scenario_layout(_stage)
    SCENARIOS[f"z{_stage}_restore_exact"] = scenario_restore_exact(_stage)
for _stage in (2, 3):
    SCENARIOS[f"z{_stage}_engine_module"] = scenario_engine_module(_stage)
for _stage in (1, 2):
    SCENARIOS[f"z{_stage}_ga2_not_boundary"] = scenario_ga_not_boundary(_stage)
SCENARIOS["z2_opt_refusals"] = scenario_opt_refusals(2)
SCENARIOS["z3_offload_refused"] = scenario_offload_refused
SCENARIOS["z2_hf_trainer_refused"] = scenario_hf_trainer_refused
for _m in ("freelb", "smart", "sift"):
    SCENARIOS[f"z3_{_m}"] = scenario_activation_z3(_m)


def main(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renames of the c10d collectives
    import deepspeed
    from deepspeed.utils import logger
    logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results, cpu = {}, {}
    for name in names:
        t0 = time.process_time()
        try:
            torch.manual_seed(0)
            SCENARIOS[name](rank, world)
            results[name] = "ok"
        except Exception:  # collected: both ranks keep issuing the same collectives
            results[name] = traceback.format_exc()
        cpu[name] = round(time.process_time() - t0, 3)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(out, f"rank{rank}_cpu_s.json"), "w") as f:  # per-scenario CPU seconds, for trimming
        json.dump(cpu, f)
