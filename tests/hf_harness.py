"""The Trainer harness shared by tests/test_hf_trainer*.py (and tests/hf_ddp_worker.py): a fixed
dataset read in order, TrainingArguments for plain SGD (the update is lr * grad, so a wrong gradient
scale shows up in the weights; Adam would hide it), and the parameter comparisons."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from fused_adv.integrations.hf import AdversarialTrainerMixin
from models import tiny_bert_cls

VOCAB, SEQ, BS, N_DATA = 64, 8, 4, 32
LR = 0.5           # large enough that the adversarial part of the gradient moves the weights visibly
RTOL = 2e-5
# Method arguments used for both the Trainer and the reference loop (values chosen so every
# perturbation is active and changes the gradient: FGSM's epsilon is per element).
KW = {"fgm": {"epsilon": 0.5}, "fgsm": {"epsilon": 0.02}, "pgd": {"epsilon": 0.6, "alpha": 0.3},
      "awp": {"adv_lr": 0.5, "adv_eps": 0.05}}
PGD_K = 3
# Activation-space methods: large steps on this tiny model so the adversarial term visibly moves the
# weights (the defaults, e.g. SMART's noise_var 1e-5, would leave it at rounding level).
KW.update({"freelb": {"adv_K": 2, "adv_lr": 0.5, "adv_init_mag": 1.0},
           "smart": {"adv_alpha": 5.0, "noise_var": 0.5, "step_size": 1.0},
           "sift": {"learning_rate": 0.5, "init_perturbation": 0.3, "vat_lambda": 5.0}})
SEED = 1234


class SeedEachStep(TrainerCallback):
    """torch.manual_seed(SEED + step) when each optimizer step begins, so that the hand loops can
    replay the random draws of the activation methods (FreeLB's init, SMART's and SiFT's noise)."""

    def on_step_begin(self, args, state, control, **kwargs):
        torch.manual_seed(SEED + state.global_step)


def dataset(n=N_DATA, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[SEQ - 1 - i % 3:] = 0           # some padding, as real batches have
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i * 7 % 2)})
    return rows


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class OrderedTrainer(Trainer):
    """The data in dataset order (the default sampler shuffles)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class AdvTrainer(AdversarialTrainerMixin, OrderedTrainer):
    pass


def targs(tmp_path, steps, ga=1, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BS,
                gradient_accumulation_steps=ga, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
                max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no", logging_steps=1,
                disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def run_trainer(tmp_path, method, steps=3, ga=1, trainer_cls=AdvTrainer, model=None, setup=None,
                args_kw=None, data=None, **akw):
    model = tiny_bert_cls(seed=0, vocab=VOCAB) if model is None else model
    kwargs = dict(KW.get(method, {}))
    kwargs.update(akw)
    extra = {"adversarial": method, "adversarial_kwargs": kwargs} if issubclass(trainer_cls, AdversarialTrainerMixin) else {}
    tr = trainer_cls(model=model, args=targs(tmp_path, steps, ga, **(args_kw or {})),
                     train_dataset=dataset() if data is None else data, callbacks=[SeedEachStep()], **extra)
    if setup is not None:
        setup(tr)
    tr.train()
    return tr


def trainer_divides_by_ga(tr) -> bool:
    """Whether the installed Trainer divides this model's loss by the GA steps (it does not when
    the model accepts loss kwargs and num_items_in_batch is known: transformers >= 4.46)."""
    if getattr(tr, "loss_is_scaled_for_ga", None) is not None:
        return not tr.loss_is_scaled_for_ga
    return not (getattr(tr, "model_accepts_loss_kwargs", False) or tr.compute_loss_func is not None)


def cpu_grad_scaler(init_scale):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler('cpu') needs torch >= 2.3")
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)


class ScalerSpyTrainer(AdvTrainer):
    """Records the GradScaler's per-optimizer stage after every training_step: READY means nobody
    called unscale_ during the step (the Trainer unscales once, in scaler.step)."""

    def training_step(self, *args, **kwargs):
        out = super().training_step(*args, **kwargs)
        scaler = self.accelerator.scaler
        opt = self.optimizer.optimizer
        state = scaler._per_optimizer_states.get(id(opt)) if hasattr(scaler, "_per_optimizer_states") else None
        self.stages.append(None if not state else state["stage"])
        return out


def install_scaler(init_scale):
    def setup(tr):
        # accelerate builds a GradScaler only for fp16 on an accelerator; on CPU we hand it a CPU
        # one (before train(): AcceleratedOptimizer takes it at prepare time), which is the same
        # path: accelerator.backward scales, AcceleratedOptimizer.step unscales/skips/updates.
        tr.accelerator.scaler = cpu_grad_scaler(init_scale)
        tr.stages = []
    return setup


def lora_bert():
    peft = pytest.importorskip("peft")
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["query", "value"], init_lora_weights="gaussian")
    return peft.get_peft_model(model, cfg)


def assert_same_params(trained, expected, rtol=RTOL):
    got = dict(trained.named_parameters())
    for name, p in expected.named_parameters():
        q = got[name].detach()
        # floor 1e-3: attention key biases get a pure rounding-noise gradient (softmax is invariant
        # to them) and stay ~1e-13; every other tensor is >= 1e-3 here
        err = (q - p.detach()).abs().max().item() / max(p.detach().abs().max().item(), 1e-3)
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"


def assert_params_differ(a, b, min_rel=1e-4):
    """Guards the comparisons above against passing vacuously (e.g. if the adversarial pass did
    nothing, the plain run would also match the reference)."""
    worst = max((p.detach() - q.detach()).abs().max().item() / max(q.abs().max().item(), 1e-12)
                for p, q in zip(a.parameters(), b.parameters()))
    assert worst > min_rel, f"runs differ by only {worst:.3g}: the test could not fail"


needs_ddp_opt_in = pytest.mark.skipif(not os.environ.get("FUSED_ADV_TEST_DDP"),
                                      reason="2-process DDP run (~1 min on 2 cores): set FUSED_ADV_TEST_DDP=1")


def run_ddp_worker(tmp_path, method):
    """tests/hf_ddp_worker.py on 2 CPU processes (gloo) through torch.distributed.run; returns what
    rank 0 saved."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    out = str(tmp_path / "ddp.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), os.path.join(here, "hf_ddp_worker.py"), out, method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


def frozen_embedding_bert():
    m = tiny_bert_cls(seed=0, vocab=VOCAB)
    m.get_input_embeddings().weight.requires_grad_(False)
    return m


class TRLStyleTrainer(OrderedTrainer):
    """A subclass like TRL's: its own compute_loss (pops labels, own loss), a _prepare_inputs that
    must run once per batch (TRL's GRPO generates there) and a training_step with a counter."""

    counts = None

    def _prepare_inputs(self, inputs):
        self.counts["prepare"] += 1
        return super()._prepare_inputs(inputs)

    def training_step(self, *args, **kwargs):
        self.counts["step"] += 1
        return super().training_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.counts["loss"] += 1
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return (loss, logits) if return_outputs else loss


def record_no_sync(seen: list):
    """A run_trainer setup: accelerator.no_sync replaced by a recorder; ``seen`` gets, at every
    forward of the model, whether that pass runs under no_sync."""
    state = {"no_sync": False}

    @contextlib.contextmanager
    def recording_no_sync(model=None):
        old, state["no_sync"] = state["no_sync"], True
        try:
            yield
        finally:
            state["no_sync"] = old

    def setup(tr):
        tr.accelerator.no_sync = recording_no_sync
        tr.model.register_forward_pre_hook(lambda m, a, k: seen.append(state["no_sync"]), with_kwargs=True)
    return setup
