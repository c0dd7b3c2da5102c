"""The weight-space methods under DeepSpeed ZeRO stages 0-3: 2 CPU processes (gloo), a tiny
BERT, each rank 4 of the 8 examples (docs/methods.md §12 (Sharded training)).

The scenarios live in tests/deepspeed_worker.py and run in ONE 2-process launch per test
session; each test below asserts one scenario's result on both ranks.  What they check:

* z{0,1,2,3}_{fgm,fgsm,pgd,awp,mifgsm,sam,awp_paper}: the fused class given the engine
  (``FGM(engine)``, ``PGD(engine)``, ``MIFGSM(engine)``, ``AWP(engine, engine.optimizer)``,
  ``SAM.from_engine(engine)``, ``AdvWeightPerturb(engine)``) in the plain engine loop matches the
  reference class (the paper's AWP: the fused class, proxy=None) on an unsharded single-process
  model on the global batch after 3 steps (every parameter, fp32, 1e-5 relative).  ZeRO-3 runs with a persistence threshold that
  leaves some parameters gathered (replicated path) and partitions the others.
* z{s}_two_backwards: pins what two engine.backward calls before one engine.step do: ZeRO-0/3
  add the gradients, ZeRO-1/2 replace the first by the second.
* z{s}_restore_exact: an attack moves exactly the chosen weights as the next forward sees them
  (gathered at ZeRO-3), on every rank; restore is bit-exact.
* z{s}_layout: DeepSpeedLayout's reduced per-tensor sums of squares (gradients and weights) equal
  DeepSpeed's own full tensors, with the expected number of all_reduce calls (ZeRO-1/2: one
  rebuild; ZeRO-3: one reduction, plus one rebuild when persistent weights are gathered).
* z{s}_no_grad_error: an attack (FGM, PGD, MI-FGSM, AWP, SAM.from_engine) before engine.backward
  raises ValueError naming the causes.
  no_grad_error, two_backwards, layout and restore_exact run in that order on ONE engine per
  stage (deepspeed_worker.shared_engine); the single-backward gradients two_backwards compares
  with come from the unsharded model.
* z2_opt_refusals: SAM(model=engine), SAM.first_step(zero_grad=False) at ZeRO-1/2, the paper's
  AWP with a proxy or from engine.module are refused, naming the stage and what works.
* z2_hf_trainer_refused: TrainingArguments(deepspeed=...) is set up by accelerate on CPU (the
  model becomes a DeepSpeedEngine) and AdversarialTrainerMixin refuses it (accelerate's backward
  also steps), weights untouched.
* z{2,3}_engine_module: ``FGM(engine.module)`` works as ``FGM(engine)``.
* z{1,2}_ga2_not_boundary: gradient_accumulation_steps=2, attack after a non-boundary backward
  raises, naming gradient_accumulation_steps.
* z3_offload_refused: ZeRO-Offload is refused with an error naming the stage.
* z3_{freelb,smart,sift}: the activation-space methods under ZeRO-3 train as on the unsharded
  model (the same initial noise per example on both sides).

Cost: one 2-process launch, 40 engines + one Trainer's; CPU time (both ranks and the parent, from
/usr/bin/time) in the README's DeepSpeed section.
"""
from __future__ import annotations


import pytest

pytest.importorskip("deepspeed")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import deepspeed_worker  # noqa: E402  (tests/ is on sys.path via conftest)
import two_ranks  # noqa: E402

LAUNCH_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{rank: {scenario: "ok" | traceback}} from one 2-process launch of every scenario."""
    return two_ranks.launch(deepspeed_worker, tmp_path_factory.mktemp("deepspeed"), LAUNCH_TIMEOUT_S, "DeepSpeed")


@pytest.mark.parametrize("scenario", list(deepspeed_worker.SCENARIOS))
def test_scenario(results, scenario):
    for rank in (0, 1):
        got = results[rank].get(scenario, "did not run")
        assert got == "ok", f"rank {rank}, scenario {scenario}:\n{got}"
