"""`fused-adv bench --smoke` end to end, the parameter-set registry against the real model
classes, the CPU memory tracker the benchmarks rely on, the `foreach` provider against the
reference classes, and the benchmarks/ scripts' entry points."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fused_adv import reference
from fused_adv._bench import foreach, measure
from fused_adv._bench.shapes import SHAPE_SETS, NoOpOptimizer, ParamModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    from fused_adv import cli

    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["bench", "--smoke", "--device", "cpu", "--out", str(out), "--quiet",
                   "--providers", "reference,foreach,torch,cpp"])
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
            assert (case, m, "reference") in keys and (case, m, "torch") in keys and (case, m, "foreach") in keys
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


# ---- the foreach provider: the community math in torch._foreach_* ops ---------------------------

def _models(dtype, special=False):
    """Two identical stand-in models (toy set); ``special``: three embedding-like tensors get a
    zero, a NaN-containing and an inf-containing gradient (skipped, skipped, not skipped)."""
    models = [ParamModel(SHAPE_SETS["toy"], dtype, seed=3) for _ in range(2)]
    if special:
        for m in models:
            ps = [p for n, p in m.named_parameters() if "weight" in n]
            ps[0].grad.zero_()
            ps[1].grad.view(-1)[5] = float("nan")
            ps[2].grad.view(-1)[7] = float("inf")
    return models


def _same(m1, m2, what):
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p.isnan(), q.isnan()), f"{what}: {n} NaN positions"
        assert torch.equal(p.nan_to_num(), q.nan_to_num()), f"{what}: {n}"


@pytest.mark.parametrize("special", [False, True], ids=["grads", "zero_nan_inf_grads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_foreach_provider_matches_reference_classes(dtype, special):
    """Every step of the foreach rewrite gives the reference classes' values, bit for bit (same
    element-wise operations in the same dtype), guards included; restore gives back the start."""
    for ref_cls, fe_cls, kw in ((reference.FGM, foreach.FGM, dict(emb_name="weight", epsilon=0.5)),
                                (reference.FGSM, foreach.FGSM, dict(emb_name="weight", epsilon=0.01))):
        m1, m2 = _models(dtype, special)
        start = [p.detach().clone() for p in m2.parameters()]
        a, b = ref_cls(m1, **kw), fe_cls(m2, **kw)
        a.attack()
        b.attack()
        _same(m1, m2, ref_cls.__name__)
        assert sum(not torch.equal(p, s) for p, s in zip(m2.parameters(), start)) >= 3  # they moved
        a.restore()
        b.restore()
        assert all(torch.equal(p, s) for p, s in zip(m2.parameters(), start))
    m1, m2 = _models(dtype, special)
    start = [p.detach().clone() for p in m2.parameters()]
    a = reference.PGD(m1, epsilon=0.05, alpha=0.03, emb_name="weight")
    b = foreach.PGD(m2, epsilon=0.05, alpha=0.03, emb_name="weight")
    a.backup_grad()
    b.backup_grad()
    for t in range(3):  # the ball is reached: steps 2 and 3 project
        a.attack(is_first_attack=t == 0)
        b.attack(is_first_attack=t == 0)
        _same(m1, m2, f"PGD step {t}")
    a.restore_grad()
    b.restore_grad()
    a.restore()
    b.restore()
    assert all(torch.equal(p, s) for p, s in zip(m2.parameters(), start))
    for adv_eps in (0.2, 1e-3):  # loose / tight box
        m1, m2 = _models(dtype, special)
        start = [p.detach().clone() for p in m2.parameters()]
        a = reference.AWP(m1, NoOpOptimizer(), adv_lr=0.5, adv_eps=adv_eps)
        b = foreach.AWP(m2, NoOpOptimizer(), adv_lr=0.5, adv_eps=adv_eps)
        a._save()
        a._attack_step()
        b.save()
        b.attack_step()
        _same(m1, m2, f"AWP adv_eps={adv_eps}")
        a._restore()
        b.restore()
        x = torch.zeros(1, 1, dtype=torch.long)
        assert b.attack_backward(x, None, None, 0) is not None  # the benchmark's call: save, step, restore
        assert all(torch.equal(p, s) for p, s in zip(m2.parameters(), start))


def test_foreach_provider_is_listed():
    from fused_adv._bench.providers import PROVIDERS
    assert PROVIDERS["foreach"].why_not(torch.device("cpu"), "awp") is None
    assert PROVIDERS["foreach"].classes()["pgd3"] is foreach.PGD


# ---- the benchmarks/ scripts import their code from fused_adv._bench ----------------------------

def test_bookkeeping_cpu_script_runs():
    """`python benchmarks/bookkeeping_cpu.py` (one untimed-quality rep: it must run, not measure)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bookkeeping_cpu.py"), "--reps", "1",
                          "--warmup", "0", "--threads", "1", "--providers", "community,foreach,torch"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    for method in ("FGM", "PGD-3", "AWP"):
        row = next(line for line in lines if line.startswith(method))
        assert row.count("x)") == 3, row  # community, foreach, torch: a time and a speed-up each


def test_benchmark_scripts_are_thin():
    """benchmarks/ holds entry files only: every script's code lives in fused_adv/_bench."""
    bench_dir = os.path.join(ROOT, "benchmarks")
    scripts = [f for f in os.listdir(bench_dir) if f.endswith(".py") and not f.startswith(("test_", "conftest", "__init__"))]
    assert scripts
    for f in scripts:
        text = open(os.path.join(bench_dir, f)).read()
        assert "from fused_adv._bench" in text and "def " not in text, f
