"""`fused-adv bench --smoke` end to end, the parameter-set registry against the real model
classes, and the CPU memory tracker the benchmarks rely on."""
import json
import math

import pytest
import torch

from fused_adv._bench import measure
from fused_adv._bench.shapes import SHAPE_SETS, ParamModel


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    from fused_adv import cli

    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["bench", "--smoke", "--device", "cpu", "--out", str(out), "--quiet",
                   "--providers", "reference,torch,cpp"])
    assert rc == 0
    return out


def test_bench_writes_outputs(bench_out):
    for name in ("results.json", "results.md", "results.png"):
        assert (bench_out / name).stat().st_size > 0, name
    res = json.loads((bench_out / "results.json").read_text())
    meta = res["meta"]
    assert meta["device_type"] == "cpu" and meta["versions"]["torch"] == torch.__version__
    assert meta["date"].endswith("UTC")
    md = (bench_out / "results.md").read_text()
    assert "AWP" in md and "reference" in md


def test_bench_rows_are_consistent(bench_out):
    rows = json.loads((bench_out / "results.json").read_text())["rows"]
    keys = {(r["case"], r["method"], r["provider"]) for r in rows}
    for case in ("toy/fp32", "toy/bf16"):
        for m in ("FGM", "FGSM", "PGD-3", "AWP"):
            assert (case, m, "reference") in keys and (case, m, "torch") in keys
    for r in rows:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["host_syncs"] is None  # CPU: no host/device boundary
        if r["provider"] == "reference":
            assert r["speedup"] == pytest.approx(1.0)
    by = {(r["case"], r["method"], r["provider"]): r for r in rows}
    for case in ("toy/fp32", "toy/bf16"):
        # the community AWP holds backup, lo and hi: at least 3 copies of the perturbed weights
        assert by[(case, "AWP", "reference")]["mem_ratio"] >= 3.0
        # every adversary keeps at least one backup of what it perturbs
        for prov in ("reference", "torch"):
            assert by[(case, "FGM", prov)]["mem_ratio"] >= 1.0
            assert by[(case, "AWP", prov)]["mem_ratio"] >= 1.0
        # the community PGD clones every gradient (all parameters, not only the embedding)
        toy = SHAPE_SETS["toy"]
        assert by[(case, "PGD-3", "reference")]["mem_ratio"] >= toy.numel / toy.numel_matching("word_embeddings")


def test_min_bytes_follow_design():
    s = SHAPE_SETS["toy"]
    emb = s.numel_matching("word_embeddings")
    assert measure.min_bytes("fgm", s, torch.float32) == 7 * emb * 4
    assert measure.min_bytes("pgd3", s, torch.bfloat16) == 21 * emb * 2
    assert measure.min_bytes("awp", s, torch.float32) == 8 * s.numel_matching("weight") * 4


def _meta_params(model):
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_bert_sets_match_transformers():
    tf = pytest.importorskip("transformers")
    cfgs = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
            "bert-mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)}
    for name, kw in cfgs.items():
        with torch.device("meta"):
            model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=30522, num_labels=2, **kw))
        assert list(SHAPE_SETS[name].params) == _meta_params(model), name
    assert abs(SHAPE_SETS["bert-large"].numel / 1e6 - 335.1) < 0.2
    assert abs(SHAPE_SETS["bert-mini"].numel / 1e6 - 11.2) < 0.1


def test_deberta_v3_large_matches_transformers():
    tf = pytest.importorskip("transformers")
    cfg = tf.DebertaV2Config(vocab_size=128100, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, relative_attention=True, position_buckets=256,
                             max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                             pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                             num_labels=2)
    with torch.device("meta"):
        model = tf.DebertaV2ForSequenceClassification(cfg)
    assert sorted(SHAPE_SETS["deberta-v3-large"].params) == sorted(_meta_params(model))


def test_param_model_names_drive_community_selection():
    m = ParamModel(SHAPE_SETS["toy"])
    names = [n for n, _ in m.named_parameters()]
    assert names == [n for n, _ in SHAPE_SETS["toy"].params]
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())
    assert sum(math.prod(p.shape) for n, p in m.named_parameters() if "word_embeddings" in n) == 1000 * 32


def test_storage_tracker_counts_peak_and_frees():
    p = torch.nn.Parameter(torch.randn(1000))
    t = measure.StorageTracker()
    with t:
        t.hold([p])
        b = p.data.clone()            # +4000 bytes (a backup)
        tmp = b * 2                   # +4000, freed right away
        del tmp
        p.data = b                    # the old storage of p dies: back to one copy
        del b
    assert t.extra_peak == 8000
    assert t.current - t.baseline == 0
