"""HF Trainer scenarios for tests/sharding_worker.py (docs/hf.md, "Sharded training"): the
AdversarialTrainerMixin on a tiny BERT sharded by hand, in the one 2-rank gloo launch.

Why by hand: accelerate (1.15) configures FSDP only for accelerator devices; on CPU with 2 gloo
processes ``TrainingArguments(fsdp=..., fsdp_config=...)`` is silently ignored (the state stays
MULTI_CPU and the model is wrapped in DDP).  So each rank builds the Trainer as a single process
(accelerate does not wrap the model) around a model it sharded itself with
``torch.distributed.fsdp.fully_shard`` (FSDP2) or ``FullyShardedDataParallel(use_orig_params=True)``
(FSDP1) over the process group the worker initialised: the Trainer's forward, backward (FSDP
reduce-scatters the gradients) and optimizer step run on the sharded model exactly as under
accelerate's FSDP, and the mixin's step is the one under test.  Both ranks train on the same
batches, so the run must equal the same Trainer + mixin on an unsharded copy (FSDP averages two
equal gradients): a wrong reduction (a norm over the local piece only) or a lost write would show.
"""
from __future__ import annotations

import copy
import tempfile

import torch

RTOL = 1e-5


def _full_params(model, fsdp1: bool) -> dict:
    from torch.distributed.tensor import DTensor
    if fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model):
            return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach()).clone()
            for n, p in model.named_parameters()}


def run_hf(chk, rank, methods, fsdp1: bool) -> None:
    import hf_harness as T
    from models import tiny_bert_cls
    for method in methods:
        base = tiny_bert_cls(seed=0, vocab=T.VOCAB)
        ref = copy.deepcopy(base)
        if fsdp1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            sharded = FSDP(base, use_orig_params=True, device_id=torch.device("cpu"))
        else:
            from torch.distributed.fsdp import fully_shard
            if method == "freelb":  # FreeLB looks the embedding up outside forward: its own unit
                fully_shard(base.get_input_embeddings())
            for layer in base.bert.encoder.layer:
                fully_shard(layer)
            sharded = fully_shard(base)
        with tempfile.TemporaryDirectory() as tmp:
            # remove_unused_columns=False: the Trainer reads the columns off the model's forward
            # signature, which the FSDP1 wrapper hides (accelerate wraps after that check)
            tr = T.run_trainer(tmp + "/s", method, steps=2, model=sharded,
                               args_kw={"remove_unused_columns": False})
            chk.true(f"{method}: the Trainer did not wrap the sharded model ({type(tr.model_wrapped).__name__})",
                     tr.model_wrapped is sharded)
            got = _full_params(sharded, fsdp1)
            want = dict(T.run_trainer(tmp + "/r", method, steps=2, model=ref).model.named_parameters())
        moved = False
        for name, w in want.items():
            w = w.detach()
            g = got.get(name)
            if g is None:
                chk.errors.append(f"{method}: {name} missing from the sharded model")
                continue
            # near-zero entries (e.g. attention key biases, whose gradient is 0 up to rounding) are
            # judged against 1% of the tensor's largest entry, and at least 1e-4 (init std 0.02)
            chk.close(f"hf {method} {'fsdp1' if fsdp1 else 'fsdp2'} {name}", g, w, rtol=RTOL,
                      scale=w.double().abs().clamp_min(1e-2 * w.double().abs().max()).clamp_min(1e-4))
            moved = moved or not torch.equal(w, tiny_bert_cls(seed=0, vocab=T.VOCAB).state_dict()[name])
        chk.true(f"{method}: training moved the weights", moved)


def refused_hf(chk, fsdp1: bool) -> None:
    """Methods not supported on sharded parameters raise a clear error at the first step."""
    import hf_harness as T
    from models import tiny_bert_cls
    base = tiny_bert_cls(seed=0, vocab=T.VOCAB)
    if fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        sharded, method = FSDP(base, use_orig_params=True, device_id=torch.device("cpu")), "freelb"
        want = "FSDP1"
    else:
        from torch.distributed.fsdp import fully_shard
        sharded, method, want = fully_shard(base), "yopo", "sharded parameters"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            T.run_trainer(tmp, method, steps=1, model=sharded, args_kw={"remove_unused_columns": False})
            chk.errors.append(f"{method} on {'FSDP1' if fsdp1 else 'FSDP2'}: no error")
        except NotImplementedError as e:
            chk.true(f"{method} refusal names the reason: {e}", want in str(e))
