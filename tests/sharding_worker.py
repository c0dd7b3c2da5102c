"""Per-rank scenarios for tests/test_sharding.py: 2 gloo processes on CPU.

Each scenario builds a tiny sharded model, computes the unsharded (full-tensor) statistics in
float64 as the oracle, then localizes the parameters with fused_adv.sharding and checks the
reduced statistics, the number of all_reduce calls per phase and the in-place writes.  Failures
are collected, not raised mid-scenario, so both ranks always issue the same collectives; each
rank writes {scenario: "ok" | traceback} to <out>/rank<r>.json.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

RTOL = 1e-6


class Tiny(nn.Module):
    """Shapes chosen against a world of 2: emb [5, 4] and lin.weight [3, 4] have an odd dim 0
    (uneven Shard(0) pieces), ``single`` [1, 6] is held entirely by rank 0 under Shard(0)
    (rank 1's piece is empty), ``frozen`` gets no gradient."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 3)
        self.single = nn.Parameter(torch.randn(1, 6))
        self.unused = nn.Parameter(torch.randn(2, 2))  # requires grad, never used: grad stays None
        self.norm = nn.LayerNorm(3)

    def forward(self, ids):
        h = self.norm(torch.tanh(self.lin(self.emb(ids))))
        return ((h * self.single[0, :3]).sum(-1) + self.single[0, 3:].sum()).pow(2).mean()


class Fsdp1Tiny(nn.Module):
    """Parameters a [5], b [3, 2], c [3] flatten into 14 elements, 7 per rank: a lies entirely
    in rank 0's shard, c entirely in rank 1's, b is split; ``inner`` is a second FSDP unit."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(5))
        self.b = nn.Parameter(torch.randn(3, 2))
        self.c = nn.Parameter(torch.randn(3))
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        h = x[:, :5] * self.a + x[:, :2].matmul(self.b.t()).sum(-1, keepdim=True)
        return (self.inner(h[:, :3] * self.c) ** 2).mean()


class CallCounter:
    """Wraps torch.distributed.all_reduce (what fused_adv.sharding calls) and counts calls."""

    def __init__(self):
        self.calls = []

    @contextlib.contextmanager
    def counting(self):
        original = dist.all_reduce

        def wrapped(tensor, *args, **kwargs):
            self.calls.append((tuple(tensor.shape), kwargs.get("group")))
            return original(tensor, *args, **kwargs)

        dist.all_reduce = wrapped
        try:
            yield self
        finally:
            dist.all_reduce = original

    def take(self) -> int:
        n = len(self.calls)
        self.calls = []
        return n


class Checks:
    def __init__(self):
        self.errors = []

    def close(self, what, got, want, rtol=RTOL, scale=None):
        """|got - want| <= rtol * scale elementwise (scale defaults to |want|)."""
        got = got.detach().double().cpu()
        want = want.detach().double().cpu()
        if got.shape != want.shape:
            self.errors.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        scale = want.abs() if scale is None else scale.double().cpu()
        err = (got - want).abs()
        bad = err > rtol * scale
        if bad.any():
            worst = (err / scale.clamp_min(1e-300)).max().item()
            self.errors.append(f"{what}: rel err {worst:.3g} > {rtol}: got {got.tolist()} want {want.tolist()}")

    def equal(self, what, got, want):
        if got != want:
            self.errors.append(f"{what}: {got!r} != {want!r}")

    def true(self, what, cond):
        if not cond:
            self.errors.append(what)

    def raise_if_any(self):
        if self.errors:
            raise AssertionError("\n".join(self.errors))


def full(t):
    """The whole tensor: gathered for a DTensor (a collective), detached otherwise."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def full_stats(full_p, full_g, backups):
    """float64 oracles over full tensors: sumsq(G), sumsq(P), pgd [N,3] with B, max|G|."""
    gs = torch.stack([g.double().pow(2).sum() for g in full_g])
    ps = torch.stack([p.double().pow(2).sum() for p in full_p])
    pgd = torch.stack([torch.stack([g.double().pow(2).sum(), ((p.double() - b.double()) * g.double()).sum(),
                                    (p.double() - b.double()).pow(2).sum()])
                       for p, g, b in zip(full_p, full_g, backups)])
    mx = torch.stack([g.double().abs().max() for g in full_g])
    return gs, ps, pgd, mx


def check_reductions(chk, counter, loc, full_p, full_g, scale, want_collectives, tag):
    """The four reduction phases on the live local pieces vs the full-tensor oracle.  Backups are
    ``scale * P`` (elementwise, so the local backup is the piece of the full backup)."""
    from fused_adv import ops
    live = loc.live
    P, G = loc.params, loc.grads
    B = [p * scale for p in P]
    fp = [full_p[i] for i in live]
    fg = [full_g[i] for i in live]
    gs, ps, pgd, mx = full_stats(fp, fg, [p * scale for p in fp])
    with counter.counting():
        got = loc.reduce(ops.multi_tensor_sumsq(G))
        chk.equal(f"{tag} sumsq collectives", counter.take(), want_collectives)
        chk.close(f"{tag} sumsq", got, gs)

        n = len(P)
        both = ops.multi_tensor_sumsq(G + P).view(2, n)
        got = loc.reduce(both, dim=1)
        chk.equal(f"{tag} awp [2,L] collectives", counter.take(), want_collectives)
        chk.close(f"{tag} awp grad sumsq", got[0], gs)
        chk.close(f"{tag} awp param sumsq", got[1], ps)

        got = loc.reduce(ops.pgd_reduce(P, G, B, False))
        chk.equal(f"{tag} pgd collectives", counter.take(), want_collectives)
        # <P-B, G> may cancel: its error is relative to ||P-B|| ||G|| (Cauchy-Schwarz), the others to themselves
        dot_scale = (pgd[:, 0] * pgd[:, 2]).sqrt()
        chk.close(f"{tag} pgd [N,3]", got, pgd, scale=torch.stack([pgd[:, 0], dot_scale, pgd[:, 2]], 1))

        got = loc.reduce(torch.stack([g.abs().max() for g in G]), op="max")
        chk.equal(f"{tag} max collectives", counter.take(), want_collectives)
        chk.close(f"{tag} max", got, mx)


def init(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


# -- scenarios ----------------------------------------------------------------------------------

def scenario_fsdp2(rank, world):
    """FSDP2 fully_shard on a 1-D mesh: Shard(0), uneven pieces, an empty piece, grads without
    grads; reductions, one collective per phase, FGM written into the local shards, restore."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from fused_adv import ops
    from fused_adv.sharding import ShardingError, ShardingLayout
    chk, counter = Checks(), CallCounter()
    torch.manual_seed(0)
    model = Tiny()
    # ``unused`` stays a plain parameter (FSDP2 ignores it): localize must not mistake it for a
    # parameter caught unsharded.
    early = ShardingLayout(model)  # built before wrapping, as a method built early would be
    fully_shard(model, ignored_params={model.unused})
    torch.manual_seed(100 + rank)  # each rank its own batch: FSDP2 averages the grads
    model(torch.randint(0, 5, (3, 4))).backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = [p.grad for p in params]
    chk.true("params are DTensors", all(isinstance(p, DTensor) for n, p in named if n != "unused"))
    chk.true("unused has no grad", model.unused.grad is None)
    full_p = [full(p).clone() for p in params]
    full_g = [(full(g) if g is not None else None) for g in grads]
    layout = ShardingLayout(model)
    loc = layout.localize(params, grads, names=[n for n, _ in named])
    chk.equal("slots", len(loc.locals), len(params))
    single = [n for n, _ in named].index("single")
    chk.equal("single's piece numel", loc.locals[single].numel(), 6 if rank == 0 else 0)
    chk.true("single live only on rank 0", (single in loc.live) == (rank == 0))
    chk.true("sharded", loc.sharded)
    # The local pieces share the DTensor's storage.
    for i, p in enumerate(params):
        own = p._local_tensor if isinstance(p, DTensor) else p
        chk.true(f"{named[i][0]} local shares storage", loc.locals[i].numel() == 0 or
                 loc.locals[i].data_ptr() == own.data_ptr())
    check_reductions(chk, counter, loc, full_p, full_g, 0.9, 1, "fsdp2")
    # A plan is reused: a second localize builds no new index tensors but the same reductions.
    # slots=True: the per-tensor sums for every parameter (0 for ``unused``, no grad anywhere),
    # also those this rank holds nothing of: their sum is the global norm SAM needs.
    with counter.counting():
        every = loc.reduce(ops.multi_tensor_sumsq(loc.grads), slots=True)
        chk.equal("slots=True collectives", counter.take(), 1)
    want = torch.stack([g.double().pow(2).sum() if g is not None else torch.zeros((), dtype=torch.float64)
                        for g in full_g])
    chk.close("slots=True per-tensor sums", every, want)
    chk.close("global norm^2 from slots=True", every.sum(), want.sum())
    loc2 = layout.localize(params, grads)
    chk.true("plan cached", loc2.plan is loc.plan)
    pieces = layout.pieces(params)
    chk.true("pieces() are the same local pieces",
             all(a.data_ptr() == b.data_ptr() and a.shape == b.shape for a, b in zip(pieces, loc.locals)))
    chk.true("plan still cached after pieces()", layout.localize(params, grads).plan is loc.plan)

    # FGM on the local pieces; the full weights must be P + eps*G/||G|| of the full tensors.
    eps = 0.5
    backups = [torch.empty_like(t) for t in loc.params]
    with counter.counting():
        sumsq = loc.reduce(ops.multi_tensor_sumsq(loc.grads))
        ops.fgm_perturb_(loc.params, loc.grads, backups, sumsq, eps, True)
        chk.equal("fgm collectives", counter.take(), 1)
    after = [full(p) for p in params]
    for i, (n, _) in enumerate(named):
        if full_g[i] is None:
            chk.close(f"fgm {n} untouched", after[i], full_p[i], rtol=0)
            continue
        step = eps * full_g[i].double() / full_g[i].double().norm()
        # fp32 rounding of P + step: relative to the terms, not to a result that may cancel
        chk.close(f"fgm {n}", after[i], full_p[i].double() + step, scale=full_p[i].double().abs() + step.abs())
    ops.restore_(loc.params, backups)
    for i, (n, _) in enumerate(named):
        chk.true(f"restore {n} bit-exact", torch.equal(full(params[i]), full_p[i]))
    # Unsharded (after unshard(), or between forward and backward with reshard_after_forward=False)
    # the registered parameters are plain gathered tensors whose writes would be lost: refused.
    early.localize(params, grads)  # meets the DTensors: notices FSDP2
    model.unshard()
    for which, lay in (("layout", layout), ("early layout", early)):
        try:
            lay.localize([p for _, p in model.named_parameters()], [None] * len(named))
            chk.errors.append(f"unsharded FSDP2 parameters ({which}): no error")
        except ShardingError as e:
            chk.true(f"unsharded message: {e}", "reshard" in str(e))
    model.reshard()
    chk.raise_if_any()


def scenario_hsdp(rank, world):
    """HSDP as fully_shard builds it on a 2-D (replicate=1, shard=2) mesh: placements
    (Replicate(), Shard(0)); the statistics are reduced over the shard dim only, once per phase."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from fused_adv.sharding import ShardingLayout
    chk, counter = Checks(), CallCounter()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    model = Tiny()
    fully_shard(model, mesh=mesh)
    torch.manual_seed(100 + rank)
    model(torch.randint(0, 5, (3, 4))).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    chk.true("HSDP placements", all(tuple(p.placements) == (Replicate(), Shard(0)) for p in params))
    full_p = [full(p).clone() for p in params]
    full_g = [(full(g) if g is not None else None) for g in grads]
    loc = ShardingLayout(model).localize(params, grads)
    chk.equal("one process group (the shard dim)", len(loc.plan.groups), 1)
    check_reductions(chk, counter, loc, full_p, full_g, 0.9, 1, "hsdp")
    chk.raise_if_any()


def scenario_hsdp_tp(rank, world):
    """A 2-D (1, 2) mesh: HSDP placements (Replicate, Shard(0)), TP Shard(1) / Replicate
    parameters, and one sharded over both dims: one collective per mesh-dim group that shards
    something; replicated tensors are not summed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from fused_adv.sharding import localize
    chk, counter = Checks(), CallCounter()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("rep", "shard"))
    mesh1 = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # same full tensors on every rank
    shapes = [(5, 3), (3, 5), (4, 7), (2, 2), (1, 4)]
    full_p = [torch.randn(s) for s in shapes]
    full_g = [torch.randn(s) for s in shapes]
    layouts = [(mesh, [Replicate(), Shard(0)]),   # HSDP
               (mesh1, [Shard(1)]),               # TP column pieces, 3x5 -> 3 + 2 columns
               (mesh1, [Replicate()]),            # TP replicated (norm weights)
               (mesh, [Shard(1), Shard(0)]),      # sharded on both dims
               (mesh1, [Shard(0)])]               # held entirely by rank 0
    params, grads = [], []
    for p, g, (m, pl) in zip(full_p, full_g, layouts):
        params.append(nn.Parameter(distribute_tensor(p, m, pl)))
        grads.append(distribute_tensor(g, m, pl))
    loc = localize(params, grads)
    # groups: mesh dim 1 (shard) and mesh1 dim 0 may be different process-group objects; count them
    groups = set()
    for p in params:
        for d, pl in enumerate(p.placements):
            if not pl.is_replicate():
                groups.add(id(p.device_mesh.get_group(d)))
    check_reductions(chk, counter, loc, full_p, full_g, 0.5, len(groups), "hsdp/tp")
    chk.true("replicated slot stays un-reduced", 2 in loc.live)
    chk.true(f"several process groups ({len(groups)}), none sharding every tensor", len(groups) >= 2)
    chk.raise_if_any()


def scenario_partial(rank, world):
    """Partial placements are refused with a message that says what to do."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from fused_adv.sharding import ShardingError, localize
    chk = Checks()
    mesh = init_device_mesh("cpu", (world,))
    p = nn.Parameter(DTensor.from_local(torch.ones(2, 3), mesh, [Shard(0)], run_check=False))
    g_partial = DTensor.from_local(torch.ones(2, 3), mesh, [Partial()], run_check=False)
    for what, params, grads in [("grad", [p], [g_partial]),
                                ("param", [nn.Parameter(DTensor.from_local(torch.ones(2), mesh, [Partial()],
                                                                           run_check=False))], [None])]:
        try:
            localize(params, grads, names=["w"])
            chk.errors.append(f"Partial {what}: no error")
        except ShardingError as e:
            msg = str(e)
            chk.true(f"Partial {what} message names the placement and the fix: {msg}",
                     "Partial" in msg and "redistribute" in msg and "w" in msg)
    g_rep = DTensor.from_local(torch.ones(4, 3), mesh, [Replicate()], run_check=False)
    try:
        localize([p], [g_rep])
        chk.errors.append("mismatched grad placements: no error")
    except ShardingError as e:
        chk.true(f"mismatch message: {e}", "placements" in str(e))
    chk.raise_if_any()


def scenario_fsdp1(rank, world):
    """FSDP1 use_orig_params=True: 1-D views into the flat shard (a entirely on rank 0, c on
    rank 1, b split, a second unit), one collective per phase over the FSDP group, FGM written
    into the shards shows in the gathered weights; use_orig_params=False is refused."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from fused_adv import ops
    from fused_adv.sharding import ShardingError, ShardingLayout, check_model
    chk, counter = Checks(), CallCounter()
    torch.manual_seed(0)
    model = Fsdp1Tiny()
    cpu = torch.device("cpu")  # FSDP1 needs device_id to run on CPU
    model.inner = FSDP(model.inner, use_orig_params=True, device_id=cpu)
    model = FSDP(model, use_orig_params=True, device_id=cpu)
    torch.manual_seed(100 + rank)
    model(torch.randn(4, 5)).backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = [p.grad for p in params]
    with FSDP.summon_full_params(model, with_grads=True):
        full_p = [p.detach().clone() for p in params]
        full_g = [p.grad.detach().clone() for p in params]
    names = [n.replace("_fsdp_wrapped_module.", "") for n, _ in named]
    want_numel = {"a": (5, 0), "b": (2, 4), "c": (0, 3)}
    layout = ShardingLayout(model)
    loc = layout.localize(params, grads, names=names)
    for n, (n0, n1) in want_numel.items():
        i = names.index(n)
        chk.equal(f"{n} piece numel on rank {rank}", loc.locals[i].numel(), (n0, n1)[rank])
        chk.equal(f"{n} grad present", grads[i] is not None, (n0, n1)[rank] > 0)
    chk.true("sharded", loc.sharded)
    # The oracle for a live piece is the full tensor's statistic.
    check_reductions(chk, counter, loc, full_p, full_g, 0.9, 1, "fsdp1")
    # Selecting only ``a`` leaves rank 1 with no live piece: it still takes part in the collective.
    ia = names.index("a")
    loc_a = layout.localize([params[ia]], [grads[ia]], names=["a"])
    chk.equal("a live", loc_a.live, [0] if rank == 0 else [])
    with counter.counting():
        got = loc_a.reduce(ops.multi_tensor_sumsq(loc_a.grads))
        chk.equal("a-only collectives", counter.take(), 1)
    chk.close("a-only sumsq", got, full_g[ia].double().pow(2).sum().reshape(1) if rank == 0 else torch.zeros(0))
    with counter.counting():  # slots=True: rank 1, holding nothing of a, still gets a's sum
        got = loc_a.reduce(ops.multi_tensor_sumsq(loc_a.grads), slots=True)
        chk.equal("a-only slots=True collectives", counter.take(), 1)
    chk.close("a-only slots=True sumsq", got, full_g[ia].double().pow(2).sum().reshape(1))
    eps = 0.5
    backups = [torch.empty_like(t) for t in loc.params]
    with counter.counting():
        sumsq = loc.reduce(ops.multi_tensor_sumsq(loc.grads))
        ops.fgm_perturb_(loc.params, loc.grads, backups, sumsq, eps, True)
        chk.equal("fsdp1 fgm collectives", counter.take(), 1)
    with FSDP.summon_full_params(model):
        after = [p.detach().clone() for p in params]
    for i, n in enumerate(names):
        step = eps * full_g[i].double() / full_g[i].double().norm()
        chk.close(f"fsdp1 fgm {n}", after[i], full_p[i].double() + step, scale=full_p[i].double().abs() + step.abs())
    ops.restore_(loc.params, backups)
    with FSDP.summon_full_params(model):
        for i, n in enumerate(names):
            chk.true(f"fsdp1 restore {n} bit-exact", torch.equal(params[i].detach(), full_p[i]))
    # The next forward all-gathers the perturbed shards: forward under the perturbation equals
    # an unsharded forward at the perturbed weights.
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    ops.fgm_perturb_(loc.params, loc.grads, backups, sumsq, eps, True)
    with torch.no_grad():
        sharded_loss = model(x)
    ref = Fsdp1Tiny()
    with torch.no_grad():
        by_name = dict(zip(names, after))
        for n, q in ref.named_parameters():
            q.copy_(by_name[n])
        chk.close("fsdp1 forward at perturbed weights", sharded_loss, ref(x), rtol=1e-6)
    ops.restore_(loc.params, backups)

    # SHARD_GRAD_OP keeps the gathered weights from forward to backward, the original parameters
    # pointing into them: pieces() still reaches the shard, so a restore there is not lost.
    from torch.distributed.fsdp import ShardingStrategy
    torch.manual_seed(0)
    grad_op = FSDP(Fsdp1Tiny(), use_orig_params=True, device_id=cpu,
                   sharding_strategy=ShardingStrategy.SHARD_GRAD_OP)
    orig = list(grad_op.parameters())  # what a method holds (forward registers plain views instead)
    with FSDP.summon_full_params(grad_op):
        before = [p.detach().clone() for p in orig]
    out = grad_op(torch.randn(4, 5))
    chk.true("SHARD_GRAD_OP: unsharded between forward and backward", grad_op.module.b.shape == (3, 2))
    with torch.no_grad():  # as the kernels run
        for piece in ShardingLayout(grad_op).pieces(orig):
            piece.add_(1.0)
    out.backward()
    with FSDP.summon_full_params(grad_op):
        for (n, q), b in zip(grad_op.named_parameters(), before):
            chk.close(f"SHARD_GRAD_OP write to the shard reaches the next gather: {n}", q.detach(), b + 1.0)

    # A layout built on a module inside the wrapper cannot know the root unit's shards: refused.
    try:
        ShardingLayout(model.module).localize([model.module.a], [None], names=["a"])
        chk.errors.append("FSDP1 parameter outside the layout's model: no error")
    except ShardingError as e:
        chk.true(f"outside-wrapper message: {e}", "FSDP-wrapped model" in str(e))

    plain = FSDP(Fsdp1Tiny(), use_orig_params=False, device_id=cpu)
    try:
        check_model(plain)
        chk.errors.append("use_orig_params=False: no error")
    except ShardingError as e:
        chk.true(f"use_orig_params=False message: {e}", "use_orig_params=True" in str(e))
    try:
        ShardingLayout(plain)
        chk.errors.append("ShardingLayout(use_orig_params=False): no error")
    except ShardingError:
        pass
    chk.raise_if_any()


SCENARIOS = {"fsdp2": scenario_fsdp2, "hsdp": scenario_hsdp, "hsdp_tp": scenario_hsdp_tp, "partial": scenario_partial,
             "fsdp1": scenario_fsdp1}


def main(rank, world, port, out, names):
    torch.set_num_threads(1)
    init(rank, world, port)
    results = {}
    try:
        for name in names:
            try:
                SCENARIOS[name](rank, world)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


if __name__ == "__main__":  # python tests/sharding_worker.py <out> <port> [scenario ...]
    import torch.multiprocessing as mp
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out_dir, port_arg = sys.argv[1], int(sys.argv[2])
    mp.spawn(main, args=(2, port_arg, out_dir, sys.argv[3:] or list(SCENARIOS)), nprocs=2)


def _run_method(name, model, x, fsdp1=False, counter=None):
    """Clean backward, the method's attack / adversarial backward / restore; returns the full
    weights seen while perturbed and the final full grads (gathered)."""
    import fused_adv
    snaps = []

    def full_params():
        if fsdp1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            with FSDP.summon_full_params(model):
                return [p.detach().clone() for p in model.parameters()]
        return [full(p).clone() for p in model.parameters()]

    def full_grads():
        if fsdp1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            with FSDP.summon_full_params(model, with_grads=True):
                return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        return [None if p.grad is None else full(p.grad).clone() for p in model.parameters()]

    model(x).backward()
    if name == "fgm":
        m = fused_adv.FGM(model, emb_name="emb", epsilon=0.7)
        with counter.counting() if counter else contextlib.nullcontext():
            m.attack()
        snaps.append(full_params()); model(x).backward(); m.restore()
    elif name == "fgsm":
        m = fused_adv.FGSM(model, emb_name="emb", epsilon=0.01)
        m.attack(); snaps.append(full_params()); model(x).backward(); m.restore()
    elif name == "pgd":
        m = fused_adv.PGD(model, emb_name="emb", epsilon=0.5, alpha=0.3)
        m.backup_grad()
        for t in range(3):
            with counter.counting() if counter else contextlib.nullcontext():
                m.attack(is_first_attack=(t == 0))
            snaps.append(full_params())
            if t != 2:
                model.zero_grad()
            else:
                m.restore_grad()
            model(x).backward()
        m.restore()
    elif name == "awp":
        m = fused_adv.AWP(model, torch.optim.SGD(model.parameters(), lr=0.0), adv_param="weight", adv_lr=0.5, adv_eps=0.1, adv_step=2)
        step = m.attack_step

        def counted_step(first=True):
            with counter.counting() if counter else contextlib.nullcontext():
                step(first)
        m.attack_step = counted_step
        m.attack_backward(closure=lambda: (snaps.append(full_params()), model(x))[1], epoch=0)
    elif name == "mifgsm":
        m = fused_adv.MIFGSM(model, emb_name="emb", epsilon=0.5, steps=3, decay=0.9)
        m.backup_grad()
        for t in range(3):
            with counter.counting() if counter else contextlib.nullcontext():
                m.attack(is_first_attack=(t == 0))
            snaps.append(full_params())
            if t != 2:
                model.zero_grad()
            else:
                m.restore_grad()
            model(x).backward()
        m.restore()
    elif name == "sam":
        # Two SAM steps with SGD: the climb's ONE global norm covers every parameter, including
        # ``single`` (held only by rank 0) and ``unused`` (no gradient).
        opt = fused_adv.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
        for step in range(2):
            if step:
                model(x).backward()
            with counter.counting() if counter else contextlib.nullcontext():
                opt.first_step(zero_grad=True)
            snaps.append(full_params())
            model(x).backward()
            opt.second_step(zero_grad=True)
            snaps.append(full_params())
        model(x).backward()
    elif name == "awp_paper":
        # The paper's loop (proxy=None), two steps; a last calc_awp checks that the model's
        # gradients set aside for the sharded backward are put back.
        m = fused_adv.AdvWeightPerturb(model, gamma=0.05, proxy_lr=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            before = full_grads() if step == 2 else None
            with counter.counting() if counter else contextlib.nullcontext():
                diff = m.calc_awp(closure=lambda mod: mod(x))
            if step == 2:
                after = full_grads()
                if not all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                           for a, b in zip(before, after)):
                    raise AssertionError("awp_paper: calc_awp did not put the model's .grad back bit for bit")
                break
            m.perturb(diff)
            snaps.append(full_params())
            opt.zero_grad()
            model(x).backward()
            opt.step()
            m.restore(diff)
            snaps.append(full_params())
    snaps.append(full_params())
    snaps.append(full_grads())
    return snaps


COLLECTIVES = {"fgm": 1, "fgsm": 0, "pgd": 3, "awp": 2, "mifgsm": 3, "sam": 2, "awp_paper": 3}


def scenario_methods(rank, world, fsdp1=False, names=("fgm", "fgsm", "pgd", "awp")):
    """Each method fused on the sharded model (each rank half of the batch) vs the same method on
    an unsharded copy with the whole batch: every full weight seen while perturbed, the final
    weights and gradients within 1e-5; ``COLLECTIVES`` all_reduce calls in the attack steps."""
    import copy
    chk = Checks()
    for name in names:
        torch.manual_seed(0)
        base = Tiny()
        ref = copy.deepcopy(base)
        xg = torch.randint(0, 5, (4, 4), generator=torch.Generator().manual_seed(5))
        xl = xg[2 * rank: 2 * rank + 2]
        if fsdp1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            base = FSDP(base, use_orig_params=True, device_id=torch.device("cpu"))
        else:
            from torch.distributed.fsdp import fully_shard
            fully_shard(base)
        counter = CallCounter()
        got = _run_method(name, base, xl, fsdp1, counter)
        chk.equal(f"{name} all_reduce per attack step", counter.take(), COLLECTIVES[name])
        want = _run_method(name, ref, xg)
        chk.equal(f"{name} snapshots", len(got), len(want))
        for k, (a, b) in enumerate(zip(got, want)):
            for j, (u, v) in enumerate(zip(a, b)):
                if u is None or v is None:
                    # FSDP1 materializes a zero gradient for a parameter the forward never used
                    zero = (u if v is None else v)
                    chk.true(f"{name} snap {k} tensor {j}: None vs nonzero",
                             zero is None or (fsdp1 and not zero.any()))
                    continue
                # After an optimizer step (SAM, the paper's AWP) the weights carry the gradients'
                # fp32 summation-order noise (~1e-7 absolute: per-rank halves vs the whole batch),
                # so elements near zero are judged against 1% of the tensor's largest.
                floor = 1e-2 if name in ("sam", "awp_paper") else 1e-3
                if name in ("sam", "awp_paper") and k == len(got) - 1:
                    floor = 1.0  # gradients at weights that differ by that noise: vs the largest
                chk.close(f"{name} snap {k} tensor {j}", u, v, rtol=1e-5,
                          scale=v.double().abs().clamp_min(floor * v.double().abs().max()))
    chk.raise_if_any()


SCENARIOS["methods_fsdp2"] = scenario_methods
SCENARIOS["methods_fsdp1"] = lambda r, w: scenario_methods(r, w, fsdp1=True)
EXT = ("mifgsm", "sam", "awp_paper")
SCENARIOS["methods_ext_fsdp2"] = lambda r, w: scenario_methods(r, w, names=EXT)
SCENARIOS["methods_ext_fsdp1"] = lambda r, w: scenario_methods(r, w, fsdp1=True, names=EXT)


def scenario_hf(rank, world, fsdp1=False):
    """tests/sharding_hf.py: the HF Trainer mixin on a hand-sharded tiny BERT vs unsharded."""
    import sharding_hf
    chk = Checks()
    methods = ("fgm", "awp") if fsdp1 else ("fgm", "pgd", "freelb", "smart", "sift")
    sharding_hf.run_hf(chk, rank, methods, fsdp1)
    sharding_hf.refused_hf(chk, fsdp1)
    chk.raise_if_any()


SCENARIOS["hf_fsdp2"] = scenario_hf
SCENARIOS["hf_fsdp1"] = lambda r, w: scenario_hf(r, w, fsdp1=True)
