"""The one registry of benchmark parameter sets, and a stand-in model that holds one.

A parameter set is the list of ``(name, shape)`` of a real model's trainable parameters, with
the names the Hugging Face classes use, so that the community classes' substring matching
(``'word_embeddings' in name``, ``'weight' in name``) selects exactly what it selects in a real
fine-tuning run.  The bookkeeping cost of FGM/FGSM/PGD depends only on the word-embedding matrix;
AWP's on every parameter whose name contains 'weight' (embeddings, linear and LayerNorm weights,
not biases).

Sets (``SHAPE_SETS``):
  bert-base         BERT-base-uncased, 109.5M params (embedding 30522x768)
  bert-large        BERT-large, 335.1M params (the 335M set of the AWP target, docs/design.md §7 (Targets))
  deberta-v3-large  DeBERTa-v3-large, 434.0M params (embedding 128100x1024, relative positions)
  emb-128k-1024     one 128000x1024 embedding (131M elements: 262 MB in bf16, 524 MB in fp32)
  emb-128k-4096     one 128000x4096 embedding (524M elements: 1 GB in bf16)
  minilm-l6         all-MiniLM-L6-v2, the demo's model, 22.7M params
  bert-mini         the "tiny BERT" of docs/design.md §1 (Users) (4 layers, hidden 256), 11.2M params
  toy               2 layers, hidden 32: for smoke runs (CI runs the suite once, untimed)
  host-400          the host row: 400 tiny weights (a 64x16 embedding + 399 16x16), 0.1M params: the
                    step time is the per-step host (Python + dispatch) cost that a GPU would wait
                    for (a DeBERTa-large has ~390 tensors; docs/design.md §7 (Targets))
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShapeSet:
    name: str
    params: tuple[tuple[str, Shape], ...]
    note: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.params)

    def numel_matching(self, pattern: str) -> int:
        return sum(math.prod(s) for n, s in self.params if pattern in n)

    def count_matching(self, pattern: str) -> int:
        return sum(1 for n, _ in self.params if pattern in n)


def _encoder_layer(L: str, H: int, I: int, qkv: tuple[str, str, str]) -> list[tuple[str, Shape]]:
    """One post-LN transformer layer as BERT and DeBERTa-v2 name it (they differ in the q/k/v names)."""
    out = []
    for m in qkv:
        out += [(f"{L}.attention.self.{m}.weight", (H, H)), (f"{L}.attention.self.{m}.bias", (H,))]
    return out + [(f"{L}.attention.output.dense.weight", (H, H)), (f"{L}.attention.output.dense.bias", (H,)),
                  (f"{L}.attention.output.LayerNorm.weight", (H,)), (f"{L}.attention.output.LayerNorm.bias", (H,)),
                  (f"{L}.intermediate.dense.weight", (I, H)), (f"{L}.intermediate.dense.bias", (I,)),
                  (f"{L}.output.dense.weight", (H, I)), (f"{L}.output.dense.bias", (H,)),
                  (f"{L}.output.LayerNorm.weight", (H,)), (f"{L}.output.LayerNorm.bias", (H,))]


def bert_params(vocab: int, hidden: int, layers: int, intermediate: int, max_pos: int = 512,
                type_vocab: int = 2, num_labels: int = 2, prefix: str = "bert") -> list[tuple[str, Shape]]:
    """Parameter names/shapes of transformers' BertForSequenceClassification."""
    H, I = hidden, intermediate
    out = [(f"{prefix}.embeddings.word_embeddings.weight", (vocab, H)),
           (f"{prefix}.embeddings.position_embeddings.weight", (max_pos, H)),
           (f"{prefix}.embeddings.token_type_embeddings.weight", (type_vocab, H)),
           (f"{prefix}.embeddings.LayerNorm.weight", (H,)), (f"{prefix}.embeddings.LayerNorm.bias", (H,))]
    for i in range(layers):
        out += _encoder_layer(f"{prefix}.encoder.layer.{i}", H, I, ("query", "key", "value"))
    out += [(f"{prefix}.pooler.dense.weight", (H, H)), (f"{prefix}.pooler.dense.bias", (H,)),
            ("classifier.weight", (num_labels, H)), ("classifier.bias", (num_labels,))]
    return out


def deberta_v2_params(vocab: int, hidden: int, layers: int, intermediate: int, position_buckets: int = 256,
                      num_labels: int = 2) -> list[tuple[str, Shape]]:
    """Parameter names/shapes of transformers' DebertaV2ForSequenceClassification (v3 configs:
    relative attention with share_att_key, no absolute position embeddings, norm_rel_ebd)."""
    H, I = hidden, intermediate
    out = [("deberta.embeddings.word_embeddings.weight", (vocab, H)),
           ("deberta.embeddings.LayerNorm.weight", (H,)), ("deberta.embeddings.LayerNorm.bias", (H,))]
    for i in range(layers):
        out += _encoder_layer(f"deberta.encoder.layer.{i}", H, I, ("query_proj", "key_proj", "value_proj"))
    out += [("deberta.encoder.rel_embeddings.weight", (2 * position_buckets, H)),
            ("deberta.encoder.LayerNorm.weight", (H,)), ("deberta.encoder.LayerNorm.bias", (H,)),
            ("pooler.dense.weight", (H, H)), ("pooler.dense.bias", (H,)),
            ("classifier.weight", (num_labels, H)), ("classifier.bias", (num_labels,))]
    return out


def _emb(rows: int, cols: int) -> list[tuple[str, Shape]]:
    return [("embeddings.word_embeddings.weight", (rows, cols))]


def _many_tiny(n: int) -> list[tuple[str, Shape]]:
    """n tiny weights: a 64x16 word embedding (what FGM/FGSM/PGD perturb) and n-1 16x16 layer
    weights (AWP perturbs all n)."""
    return _emb(64, 16) + [(f"encoder.layer.{i}.dense.weight", (16, 16)) for i in range(n - 1)]


SHAPE_SETS: dict[str, ShapeSet] = {s.name: s for s in [
    ShapeSet("bert-base", tuple(bert_params(30522, 768, 12, 3072)), "BERT-base, 109.5M"),
    ShapeSet("bert-large", tuple(bert_params(30522, 1024, 24, 4096)), "BERT-large, 335.1M"),
    ShapeSet("deberta-v3-large", tuple(deberta_v2_params(128100, 1024, 24, 4096)), "DeBERTa-v3-large, 434.0M"),
    ShapeSet("emb-128k-1024", tuple(_emb(128000, 1024)), "one 128000x1024 embedding"),
    ShapeSet("emb-128k-4096", tuple(_emb(128000, 4096)), "one 128000x4096 embedding"),
    ShapeSet("minilm-l6", tuple(bert_params(30522, 384, 6, 1536)), "all-MiniLM-L6-v2, 22.7M"),
    ShapeSet("bert-mini", tuple(bert_params(30522, 256, 4, 1024)), "tiny BERT (4x256), 11.2M"),
    ShapeSet("toy", tuple(bert_params(1000, 32, 2, 64, max_pos=64)), "2x32 toy, smoke runs only"),
    ShapeSet("host-400", tuple(_many_tiny(400)), "400 tiny weights: per-step host cost"),
]}

# (shape set, dtype) pairs run by default.  GPU: every real set in fp32 and bf16, except that
# the 128k x 4096 embedding (2 GB in fp32 plus grad and backups) runs in bf16 only.
GPU_DEFAULT: list[tuple[str, torch.dtype]] = [
    (s, d) for s in ("bert-base", "bert-large", "deberta-v3-large", "emb-128k-1024")
    for d in (torch.float32, torch.bfloat16)] + [("emb-128k-4096", torch.bfloat16), ("host-400", torch.bfloat16)]
# CPU (2 cores in CI): the tiny BERT of the CPU target, the demo's model and the host row; the
# whole default matrix must finish in < 3 minutes.
CPU_DEFAULT: list[tuple[str, torch.dtype]] = [
    ("bert-mini", torch.float32), ("bert-mini", torch.bfloat16), ("minilm-l6", torch.float32),
    ("host-400", torch.float32)]
SMOKE: list[tuple[str, torch.dtype]] = [("toy", torch.float32), ("toy", torch.bfloat16)]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


class _Output(tuple):
    """What the stand-in model returns: ``out[0]`` and ``out.loss`` are the loss (Kaggle and HF
    conventions both work)."""

    @property
    def loss(self):
        return self[0]


# Distinct tokens in a fine-tuning batch (e.g. 32 x 128 tokens of English text: ~1-2k distinct
# ids): the word-embedding gradient is nonzero on that many rows only.
EMBEDDING_ROWS = 2048


class ParamModel(nn.Module):
    """Holds a parameter set under its real names; every parameter has a ``.grad``.

    Gradients are N(0, 1e-3) except the word embedding's, which is nonzero on
    ``embedding_rows`` random rows only (None: dense), as in a real batch.

    ``forward(input_ids=None, attention_mask=None, labels=None)`` returns a scalar loss whose
    backward touches no parameter (it is ``0 * a scalar leaf``): AWP's adversarial forward and
    backward cost nothing, so timing ``attack_backward`` times the bookkeeping alone, and the
    parameters' gradients are left as they were (``optimizer.zero_grad`` is stubbed by
    :class:`NoOpOptimizer` for the same reason).
    """

    def __init__(self, shape_set: ShapeSet, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0, embedding_rows: int | None = EMBEDDING_ROWS):
        super().__init__()
        device = torch.device(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        for name, shape in shape_set.params:
            *path, leaf = name.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            p = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
            mod.register_parameter(leaf, nn.Parameter(p))
        for name, p in self.named_parameters():
            g = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(1e-3)
            if embedding_rows is not None and "word_embeddings" in name and p.shape[0] > embedding_rows:
                # Only the rows of tokens present in the batch get a gradient (a real embedding
                # gradient is row-sparse; kernels may skip stores where nothing changes).
                keep = torch.zeros(p.shape[0], dtype=torch.bool, device=device)
                keep[torch.randperm(p.shape[0], generator=gen, device=device)[:embedding_rows]] = True
                g[~keep] = 0
            p.grad = g.to(dtype)
        self._leaf = torch.zeros((), device=device, requires_grad=True)
        self.shape_set = shape_set

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return _Output((self._leaf * 0.0,))

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in self.named_parameters()}

    def set_grads(self, grads: dict[str, torch.Tensor]) -> None:
        """Puts gradient tensors back by reference (no copy)."""
        for n, p in self.named_parameters():
            p.grad = grads[n]


class NoOpOptimizer:
    """AWP's ``optimizer.zero_grad()`` would drop the gradients the next timed call needs."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass
