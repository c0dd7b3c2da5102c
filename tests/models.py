"""Small models shared by the tests (and usable by benchmarks): a BERT-named toy model and a
tiny random-init BertForSequenceClassification."""
from __future__ import annotations

import torch
from torch import nn


class ToyEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int = 32):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class ToyBert(nn.Module):
    """Parameter names as in BERT (embeddings.word_embeddings.weight, encoder.*.weight, ...)."""

    def __init__(self, vocab: int = 50, hidden: int = 16, classes: int = 3, tie: bool = False):
        super().__init__()
        self.embeddings = ToyEmbeddings(vocab, hidden)
        self.encoder = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.classifier = nn.Linear(hidden, classes)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.encoder(self.embeddings(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.classifier(h.mean(1)) + 0.01 * self.lm_head(h).float().mean((1, 2)).unsqueeze(-1)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return (loss, logits)


def tiny_bert_cls(num_labels: int = 2, seed: int = 0, vocab: int = 64, hidden: int = 16):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def batch(seed: int, vocab: int = 50, n: int = 4, length: int = 8, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0
    labels = torch.randint(0, classes, (n,), generator=g)
    return ids, mask, labels


class ThreeLayer(nn.Module):
    """A word embedding and two linear layers: the smallest model with the names the weight
    methods select (tests of the per-step host path)."""

    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(10, 4)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)


def grads_on(model: nn.Module) -> nn.Module:
    """Gives every parameter a random .grad; returns the model."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model
