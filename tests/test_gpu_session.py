"""tools/gpu_session.sh cannot rot between the rare sessions lent a GPU (docs/gpu.md): its stage
caps fit the device call, its dry run walks every stage on this CPU machine and writes the files
a GPU run returns, and the test driver of its correctness stage (tools/gpu_tests.py) keeps every
result through a hang, a crash and a sticky CUDA error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_session.sh")
DRIVER = os.path.join(ROOT, "tools", "gpu_tests.py")
STAGES = ["env", "wheels", "build", "tests", "nosync", "bench", "demo"]  # priority order
FILES = {"env.txt", "build.log", "tests.log", "tests.xml", "nosync.log", "bench.json", "bench.md", "results.tgz"}


def test_stage_caps_fit_the_device_call():
    out = subprocess.run(["bash", SCRIPT, "--caps"], capture_output=True, text=True, timeout=30, check=True).stdout
    caps = dict(line.split() for line in out.strip().splitlines())
    deadline, total = int(caps.pop("deadline")), int(caps.pop("total"))
    assert list(caps) == STAGES
    assert sum(int(v) for v in caps.values()) == total <= deadline <= 540  # 9 minutes, results packed inside
    assert all(int(v) > 0 for v in caps.values())


@pytest.mark.slow
def test_dry_run_walks_every_stage(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # exactly the files a GPU run returns: at most 8, flat, names the device tool accepts
    names = {p.name for p in out.iterdir()}
    assert names == FILES, names
    env_txt = (out / "env.txt").read_text()
    for stage in STAGES:
        assert f"stage {stage}: ok" in env_txt, env_txt[-2000:]
    assert "fused_adv 0.1.0" in env_txt  # fused_adv.info ran

    # correctness stage: the CUDA cases were collected (their CPU twins ran), results in JUnit XML
    log = (out / "tests.log").read_text()
    n_cuda = int(log.split(" CUDA cases in ")[0].rsplit(" ", 1)[-1])
    assert n_cuda >= 100, log[-2000:]
    suite = ET.parse(out / "tests.xml").getroot().find("testsuite")
    cases = list(suite.iter("testcase"))
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert any("test_gpu_no_host_sync" in c.get("classname") for c in cases)  # the no-sync stage's
    assert sum(1 for c in cases if not list(c)) >= 3  # passed (no failure/error/skipped child)
    assert "PASSED" in (out / "nosync.log").read_text()

    # bench: merged chunks, the compile chunk skipped on CPU with its reason, headline table
    bench = json.loads((out / "bench.json").read_text())
    assert {r["provider"] for r in bench["rows"]} >= {"reference", "torch"}
    assert {r["method"] for r in bench["rows"]} == {"FGM", "PGD-3", "AWP"}
    assert "compile" in bench["meta"]["providers_skipped"] and len(bench["meta"]["chunks"]) == 2
    assert all(r["gbps"] > 0 and r["pct_copy"] > 0 for r in bench["rows"])
    assert "## Headline" in (out / "bench.md").read_text()

    # results.tgz: one folder, ready for benchmarks/results/<device>/
    with tarfile.open(out / "results.tgz") as t:
        members = set(t.getnames())
    slug = bench["meta"]["device_slug"]
    for f in ["results.json", "results.md", "results.png", "env.txt", "tests.xml", "demo/demo.json",
              "demo/demo.md", "logs/bench.log", "logs/demo.log"]:
        assert f"{slug}/{f}" in members, members


def test_driver_keeps_results_through_hang_crash_and_sticky_cuda_error(tmp_path):
    (tmp_path / "test_fake.py").write_text(textwrap.dedent("""
        import os, time
        import pytest

        @pytest.mark.parametrize("dev", ["cuda-torch", "cpu-torch"])
        def test_a_pass(dev):
            pass

        @pytest.mark.parametrize("dev", ["cuda-torch"])
        def test_b_hang(dev):
            time.sleep(60)

        @pytest.mark.parametrize("dev", ["cuda-cuda"])
        def test_c_crash(dev):
            os._exit(1)

        @pytest.mark.parametrize("dev", ["cuda-cuda"])
        def test_d_sticky(dev):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        @pytest.mark.parametrize("dev", ["cuda-triton"])
        def test_e_after(dev):
            pass
    """))
    progress, xml, log = tmp_path / "p.jsonl", tmp_path / "t.xml", tmp_path / "t.log"
    r = subprocess.run([sys.executable, DRIVER, "--progress", str(progress), "--xml", str(xml), "--log", str(log),
                        "--budget", "240", "--", "-q", "-p", "no:cacheprovider", "--cuda-cases", "--watchdog", "3",
                        "--stop-on-cuda-error", "test_fake.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + log.read_text()[-3000:]  # failures are reported, not hidden
    got = {c.get("name"): (c[0].tag if len(c) else "passed") for c in ET.parse(xml).getroot().iter("testcase")}
    assert got == {"test_a_pass[cuda-torch]": "passed", "test_b_hang[cuda-torch]": "error",
                   "test_c_crash[cuda-cuda]": "error", "test_d_sticky[cuda-cuda]": "failure",
                   "test_e_after[cuda-triton]": "passed"}, got
    # compiled-CUDA cases first, then Triton, then the rest; a fresh process after the crash and
    # after the sticky error (the cpu case deselected)
    starts = [json.loads(line).get("start") for line in progress.read_text().splitlines()]
    assert [n.split("::")[1] for n in starts if n] == [
        "test_c_crash[cuda-cuda]", "test_d_sticky[cuda-cuda]", "test_e_after[cuda-triton]",
        "test_a_pass[cuda-torch]", "test_b_hang[cuda-torch]"]
    text = log.read_text()
    assert "exceeded 3 s" in text and "gpu_tests round 3 " in text and "gpu_tests round 4" not in text
