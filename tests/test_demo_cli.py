"""`fused-adv demo --tiny` end to end: runs, writes its outputs (table with clean and attacked
accuracy, plot), the fused runs reproduce the reference runs (same losses, same final weights)
while differing clearly from the plain run; every recipe reachable through --runs, --seeds
(mean ± std), the evaluation attack's ball, and the data split."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

DEFAULT_RUNS = {"plain", "fgm-reference", "fgm-fused", "awp-reference", "awp-fused", "freelb-reference",
                "freelb-fused"}
PAIRS = (("fgm-fused", "fgm-reference"), ("awp-fused", "awp-reference"), ("freelb-fused", "freelb-reference"))


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    from fused_adv import cli

    out = tmp_path_factory.mktemp("demo")
    # --backend auto: what a user gets (cpp when the extension has the CPU kernels, else torch)
    rc = cli.main(["demo", "--tiny", "--steps", "8", "--out", str(out), "--quiet", "--backend", "auto"])
    assert rc == 0
    return out


def test_demo_writes_outputs(demo_out):
    for name in ("demo.json", "demo.md", "demo.png"):
        assert (demo_out / name).stat().st_size > 0, name
    md = (demo_out / "demo.md").read_text()
    for run in DEFAULT_RUNS:
        assert run in md
    for header in ("clean acc", "attacked acc", "overhead", "peak mem", "adv buffers", "max Δparam vs ref",
                   "ref/fused time"):
        assert header in md, header
    assert (demo_out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_fused_matches_reference(demo_out):
    res = json.loads((demo_out / "demo.json").read_text())
    runs = res["runs"]
    assert set(runs) == DEFAULT_RUNS
    for run, r in runs.items():
        assert len(r["losses"]) == 8
        assert r["median_step_ms"] > 0
        assert r["peak_mem_bytes"] > 0
        assert 0.0 <= r["val_acc"] <= 1.0
        assert r["val_acc_std"] is None and r["seeds"] == [0]   # one seed: no spread to report
        if run.endswith("-reference"):   # same weights as the fused run: not attacked again by default
            assert r["attacked_acc"] is None
        else:
            assert 0.0 <= r["attacked_acc"] <= r["val_acc"]
    for fused, ref in PAIRS:
        c = res["comparisons"][fused]
        assert c["reference"] == ref
        # fp32 drift only: the fused classes compute the same numbers in another order
        assert c["max_abs_loss_diff"] < 1e-4, c
        assert c["max_abs_param_diff"] < 1e-4, c
        assert c["step_time_ratio_reference_over_fused"] > 0
        # ... and the adversary really changes the training, so matching the reference means something
        assert runs[fused]["max_abs_param_diff_vs_plain"] > 100 * max(c["max_abs_param_diff"], 1e-7)
        assert runs[fused]["losses"] != runs["plain"]["losses"]
    # AWP starts at a quarter of the steps (8 // 4 = 2): before that its steps are plain steps
    assert runs["awp-fused"]["losses"][:2] == runs["plain"]["losses"][:2]
    assert res["meta"]["settings"]["awp"]["start_step"] == 2
    # memory: the community AWP keeps backup + lo + hi, the fused one a single backup
    assert runs["awp-fused"]["adversary_held_bytes"] > 0
    assert runs["awp-reference"]["extra_peak_vs_plain_bytes"] > runs["awp-fused"]["extra_peak_vs_plain_bytes"]
    assert res["meta"]["attack"]["eps"] > 0 and res["meta"]["attack"]["steps"] > 0


def test_demo_other_recipes_and_seeds(tmp_path):
    """PGD, MI-FGSM, SMART, SiFT and SAM through --runs, two seeds: every fused run tracks its
    reference, and the accuracy columns become mean ± std (the reference runs attacked too)."""
    from fused_adv import demo

    rc = demo.main(["--tiny", "--steps", "3", "--seeds", "0,1", "--runs", "pgd,mifgsm,smart,sift,sam",
                    "--val-size", "16", "--attack-steps", "1", "--attack-reference", "--out", str(tmp_path), "--quiet", "--no-plot"])
    assert rc == 0
    res = json.loads((tmp_path / "demo.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"plain"} | {f"{m}-{i}" for m in ("pgd", "mifgsm", "smart", "sift", "sam")
                                     for i in ("reference", "fused")}
    for r in runs.values():
        assert r["seeds"] == [0, 1] and len(r["val_acc_per_seed"]) == 2 and len(r["losses_per_seed"]) == 2
        assert r["val_acc_std"] is not None and r["attacked_acc_std"] is not None
    for m in ("pgd", "mifgsm", "smart", "sift", "sam"):
        c = res["comparisons"][f"{m}-fused"]
        assert c["max_abs_loss_diff"] < 1e-4 and c["max_abs_param_diff"] < 1e-4, (m, c)
        assert runs[f"{m}-fused"]["losses"] != runs["plain"]["losses"], m
    # the seeds differ (classifier init, data order, dropout)
    assert runs["plain"]["losses_per_seed"][0] != runs["plain"]["losses_per_seed"][1]
    assert "±" in (tmp_path / "demo.md").read_text()


def test_embedding_attack_stays_in_its_ball():
    """Per-token L2 radius eps on real tokens, zero on padding, and the loss goes up."""
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertForSequenceClassification

    from fused_adv.demo.evaluate import attacked_accuracy, clean_accuracy, embedding_attack

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=16, num_labels=2)).eval()
    ids = torch.randint(1, 50, (6, 7))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[:3, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (6,))}
    base, delta = embedding_attack(model, batch, eps=0.05, steps=3)
    norms = delta.norm(dim=-1)
    assert (norms <= 0.05 + 1e-6).all()
    assert (norms[mask == 0] == 0).all()
    assert (norms[mask == 1] > 0.04).all()          # 3 steps of 2.5 eps / 3 reach the boundary
    assert all(p.grad is None for p in model.parameters())

    def loss(d):
        with torch.no_grad():
            return F.cross_entropy(model(inputs_embeds=base + d, attention_mask=mask).logits, batch["labels"]).item()

    assert loss(delta) > loss(torch.zeros_like(delta))
    assert attacked_accuracy(model, [batch], 0.0, 3) == clean_accuracy(model, [batch])
    assert attacked_accuracy(model, [batch], 10.0, 3) <= clean_accuracy(model, [batch])


def test_demo_runs_flag():
    import argparse

    from fused_adv import demo

    def parse(*argv):
        p = argparse.ArgumentParser()
        demo.add_arguments(p)
        return demo.fill_defaults(p.parse_args(list(argv)))

    a = parse()
    assert set(a.runs) == DEFAULT_RUNS and a.seeds == [0] and a.awp_start == a.steps // 4
    assert parse("--runs", "pgd-fused").runs == ["plain", "pgd-fused"]     # plain always runs
    assert len(parse("--runs", "all").runs) == 1 + 2 * len(demo.recipes.METHODS)
    assert parse("--seeds", "3,4").seeds == [3, 4]
    for bad in (["--runs", "fgm-fast"], ["--runs", "nope"], ["--seeds", "1,1"], ["--seeds", "a"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_python_m_fused_adv_help():
    out = subprocess.run([sys.executable, "-m", "fused_adv", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for sub in ("demo", "bench", "info"):
        assert sub in out.stdout


def test_cli_info_prints_backends(capsys):
    from fused_adv import cli

    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "cpu" in text


def test_demo_data_split_is_disjoint_and_balanced():
    from fused_adv import demo

    rows = demo.load_rotten_tomatoes()
    assert len(rows) == 8530  # the Rotten Tomatoes sentence-polarity set: 4265 + 4265
    assert sum(y for _, y in rows) == 4265
    train, val = demo.split(rows, 800, 256, seed=0)
    assert not {t for t, _ in train} & {t for t, _ in val}
    # the CSV is sorted by label: an unshuffled split would be all-positive
    assert 0.35 < sum(y for _, y in train) / len(train) < 0.65
    # every seed validates on the same rows and trains on others
    t0, v0 = demo.split_for_seed(rows, 800, 256, seed=0)
    t1, v1 = demo.split_for_seed(rows, 800, 256, seed=1)
    assert v0 == v1 and t0 != t1
    assert not {t for t, _ in t0 + t1} & {t for t, _ in v0}


def test_demo_merge_seeds_run_side_by_side(demo_out, tmp_path):
    """--merge: results of one process per seed become one table with mean ± std over seeds."""
    import copy

    from fused_adv import demo

    a = json.loads((demo_out / "demo.json").read_text())
    b = copy.deepcopy(a)
    b["meta"]["seeds"] = [1]
    for r in b["runs"].values():
        r["seeds"] = [1]
        r["val_acc_per_seed"] = [min(1.0, r["val_acc"] + 0.1)]
        if r["attacked_acc"] is not None:
            r["attacked_acc_per_seed"] = [r["attacked_acc"]]
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "merged"
    assert demo.main(["--merge", f"{demo_out / 'demo.json'},{tmp_path / 'b.json'}", "--out", str(out), "--no-plot"]) == 0
    m = json.loads((out / "demo.json").read_text())
    assert m["meta"]["seeds"] == [0, 1]
    plain = m["runs"]["plain"]
    assert plain["seeds"] == [0, 1] and len(plain["losses_per_seed"]) == 2
    assert plain["val_acc_std"] > 0 and plain["attacked_acc_std"] == 0
    assert m["runs"]["fgm-reference"]["attacked_acc"] is None
    assert "±" in (out / "demo.md").read_text()
    with pytest.raises(SystemExit):   # the same seed twice
        demo.main(["--merge", f"{demo_out / 'demo.json'},{demo_out / 'demo.json'}", "--out", str(out)])
