"""fused_adv.sharding on real sharded layouts: 2 gloo processes on CPU (docs/methods.md §12
(Sharded training)).

The scenarios live in tests/sharding_worker.py and run in ONE 2-process launch per test session
(start-up dominates: ~15 s on a loaded 2-core machine); each test below asserts one scenario's
result on both ranks.  What they check:

* fsdp2: FSDP2 fully_shard (Shard(0) on a 1-D mesh) of a tiny model with uneven pieces, a
  parameter held entirely by rank 0 and one without a gradient: the localized sums of squares,
  AWP's [2, L] grads+params sums, PGD's [L, 3] sums and the maxima equal the full-tensor values
  (1e-6 relative; the dot product relative to ||P-B|| ||G||), with exactly one all_reduce per
  phase; the local pieces share the DTensor's storage; FGM written into them is the full-tensor
  FGM; restore is bit-exact.
* hsdp: fully_shard on a 2-D (replicate, shard) mesh, placements (Replicate(), Shard(0)): the
  same reductions over the shard dim only, one all_reduce per phase.
* hsdp_tp: a (1, 2) mesh with HSDP (Replicate, Shard(0)), TP Shard(1) and Replicate, a tensor
  sharded on both mesh dims and one held by one rank: one all_reduce per process group that
  shards something, replicated tensors not summed.
* partial: Partial placements (parameter or gradient) and mismatched gradient placements raise
  ShardingError saying what to do.
* fsdp1: FullyShardedDataParallel(use_orig_params=True) with two units, a parameter entirely in
  rank 0's shard, one entirely in rank 1's and one split: same reductions over the FSDP group,
  FGM written into the flat shard shows in the gathered weights and in the next forward; restore
  bit-exact; use_orig_params=False raises ShardingError naming use_orig_params=True.
* methods_fsdp2 / methods_fsdp1 (FGM, FGSM, PGD, AWP) and methods_ext_fsdp2 / methods_ext_fsdp1
  (MI-FGSM 3 steps, SAM 2 steps with SGD, the AWP paper's loop 2 steps with proxy=None): fused
  on the sharded model, each rank half of the batch, vs an unsharded run on the whole batch:
  every full weight seen while perturbed, the final weights and gradients within 1e-5, and the
  number of all_reduce calls per attack (one per reduction phase).
* hf_fsdp2 / hf_fsdp1 (tests/sharding_hf.py): the HF Trainer with AdversarialTrainerMixin around a
  tiny BERT sharded by hand (accelerate ignores fsdp= on CPU): fgm, pgd, freelb (embedding as its
  own unit), smart, sift on FSDP2 and fgm, awp on FSDP1 equal the same Trainer on an unsharded copy
  (1e-5); yopo on FSDP2 and freelb on FSDP1 are refused with the reason.
"""
from __future__ import annotations


import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import sharding_worker  # noqa: E402  (tests/ is on sys.path via conftest)
import two_ranks  # noqa: E402

LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{rank: {scenario: "ok" | traceback}} from one 2-process launch of every scenario."""
    return two_ranks.launch(sharding_worker, tmp_path_factory.mktemp("sharding"), LAUNCH_TIMEOUT_S, "sharding")


@pytest.mark.parametrize("scenario", list(sharding_worker.SCENARIOS))
def test_scenario(results, scenario):
    for rank in (0, 1):
        got = results[rank].get(scenario, "did not run")
        assert got == "ok", f"rank {rank}, scenario {scenario}:\n{got}"


def test_unsharded_is_free():
    """Plain tensors (single process, DDP): local pieces are the parameters, reduce() returns
    the very same tensor and issues no collective."""
    from fused_adv import ops
    from fused_adv.sharding import ShardingLayout, localize
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    grads = [torch.randn(3, 2), None]
    loc = localize(params, grads)
    assert not loc.sharded and loc.live == [0]
    assert loc.locals[0].data_ptr() == params[0].data_ptr()
    stats = ops.multi_tensor_sumsq(loc.grads)
    assert loc.reduce(stats) is stats
    assert [t.data_ptr() for t in ShardingLayout().pieces(params)] == [p.data_ptr() for p in params]
    every = loc.reduce(stats.clone(), slots=True)  # one row per parameter, 0 where no grad
    torch.testing.assert_close(every, torch.stack([grads[0].pow(2).sum(), torch.zeros(())]))
    both = loc.reduce(torch.stack([stats, stats + 1]), dim=1, slots=True)
    assert both.shape == (2, 2) and both[1, 1] == 0 and both[1, 0] == stats[0] + 1
    torch.testing.assert_close(stats, grads[0].pow(2).sum().reshape(1))


def test_reduce_rejects_unknown_op():
    from fused_adv.sharding import localize
    loc = localize([torch.zeros(2)], [torch.zeros(2)])
    with pytest.raises(ValueError, match="'sum' or 'max'"):
        loc.reduce(torch.zeros(1), op="mean")
