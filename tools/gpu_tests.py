"""The CUDA-correctness stage of tools/gpu_session.sh: which tests have a CUDA case, and a pytest
driver whose results survive hangs, crashes and sticky CUDA errors (docs/gpu.md).

Two roles in one file (tools/ is put on sys.path by the session script):

As a pytest plugin (``-p gpu_tests``), options:
  --cuda-cases              keep only the CUDA cases (:func:`is_cuda_case`), deselect the rest
  --cuda-twins N            dry run on a CPU machine: collect the CUDA cases exactly as above, log
                            how many there are, then run the CPU twins (``cuda-torch`` ->
                            ``cpu-torch`` in the parameter id) of the first N, one per file
  --progress FILE           append one JSON line per test as it starts and as it ends (outcome,
                            duration, message), so a run cut short keeps every finished result
  --done FILE               deselect the node ids recorded in FILE (finished in an earlier round)
  --stop-on-cuda-error      end the session after a failure that poisons the CUDA context
                            ("illegal memory access", device-side assert, ...): every later test
                            in that process would fail for the same reason
  --watchdog SECONDS        hard per-test limit used when pytest-timeout is not installed: records
                            the test as timed out, dumps every thread's stack, exits the process

As a driver (``python tools/gpu_tests.py --progress P --xml X --log L --budget S -- PYTEST_ARGS``):
  runs pytest rounds (each with the plugin and ``--done``) until every selected test has a result,
  a round makes no progress, or the budget is spent; a round that dies (per-test timeout, segfault,
  sticky CUDA error) gets the in-flight test recorded as an error and the next round resumes after
  it.  The JUnit XML is rewritten from the progress file after every round and on SIGTERM;
  ``--render`` only rewrites it (for a driver that was killed outright).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from xml.sax.saxutils import quoteattr, escape

# Failures after which the CUDA context of the process is unusable (the error is sticky).
STICKY_CUDA = re.compile(r"illegal memory access|device-side assert|unspecified launch failure|"
                         r"misaligned address|illegal instruction|CUDA error: an? \w+ (was|has) encountered|"
                         r"cudaErrorLaunchFailure|CUBLAS_STATUS_EXECUTION_FAILED", re.I)


def _param_id(nodeid: str) -> str:
    return nodeid[nodeid.index("["):] if "[" in nodeid else ""


def is_cuda_case(item) -> bool:
    """A test that exercises CUDA when a GPU is present:
    * a parameter id naming cuda (the ``device_backend`` ids ``cuda-torch|cuda-cuda|cuda-triton``,
      ``backend_name=cuda``, ...), or
    * marked ``gpu`` and not a ``cpu-*`` case of a device-parametrized test, or
    * in a module whose ``DEVICE`` is a CUDA device (tests/test_triton_weight.py,
      benchmarks/test_bench_weight.py run every test there on CUDA when one is available)."""
    pid = _param_id(item.nodeid)
    if "cuda" in pid:
        return True
    if item.get_closest_marker("gpu") is not None and not re.search(r"[\[-]cpu[-\]]", pid):
        return True
    dev = getattr(getattr(item, "module", None), "DEVICE", None)
    return dev is not None and str(dev).startswith("cuda")


def _priority(item) -> int:
    pid = _param_id(item.nodeid)
    if "cuda-cuda" in pid or re.search(r"[\[-]cuda\]", pid):
        return 0
    return 1 if "triton" in pid else 2


def _record(path: str | None, obj: dict) -> None:
    if not path:
        return
    with open(path, "a") as f:  # opened per write: a process killed right after still leaves it
        f.write(json.dumps(obj) + "\n")
        f.flush()


# ------------------------------------------------------------------------------ pytest plugin
def pytest_addoption(parser):
    g = parser.getgroup("gpu_tests", "tools/gpu_tests.py (GPU session)")
    g.addoption("--cuda-cases", action="store_true", help="keep only the tests that have a CUDA case")
    g.addoption("--cuda-twins", type=int, default=None, help="dry run: run the CPU twins of N CUDA cases")
    g.addoption("--progress", default=None, help="JSON-lines file: one line per test start and end")
    g.addoption("--done", default=None, help="progress file whose finished tests are deselected")
    g.addoption("--stop-on-cuda-error", action="store_true", help="end the session after a sticky CUDA error")
    g.addoption("--watchdog", type=float, default=None, help="hard per-test limit (s) without pytest-timeout")


def _done_ids(path: str | None) -> set[str]:
    done = set()
    if path and os.path.exists(path):
        for rec in _read(path):
            if "outcome" in rec:
                done.add(rec["nodeid"])
    return done


def pytest_collection_modifyitems(session, config, items):
    cuda_only, twins = config.getoption("--cuda-cases"), config.getoption("--cuda-twins")
    if not (cuda_only or twins is not None):
        return
    progress = config.getoption("--progress")
    cuda = [it for it in items if is_cuda_case(it)]
    by_file: dict[str, int] = {}
    for it in cuda:
        f = it.nodeid.split("::")[0]
        by_file[f] = by_file.get(f, 0) + 1
    # the never-run compiled CUDA kernels first, then Triton, then the rest: a run cut short at its
    # cap has checked what matters most (stable: file order within each group)
    keep = sorted(cuda, key=_priority)
    if twins is not None:
        ids = {it.nodeid: it for it in items}
        keep, files = [], set()
        for it in cuda:
            f = it.nodeid.split("::")[0]
            twin = ids.get(it.nodeid.replace("cuda-torch", "cpu-torch"))
            if twin is not None and twin is not it and f not in files and len(keep) < twins:
                keep.append(twin)
                files.add(f)
    done = _done_ids(config.getoption("--done"))
    selected = [it for it in keep if it.nodeid not in done]
    deselected = [it for it in items if it not in set(selected)]
    items[:] = selected
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    _record(progress, {"collected": len(cuda), "by_file": by_file, "selected": [it.nodeid for it in selected],
                       "mode": "cpu-twins" if twins is not None else "cuda"})
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"gpu_tests: {len(cuda)} CUDA cases in {len(by_file)} files; running {len(selected)}"
                      + (f" (CPU twins of {twins})" if twins is not None else "")
                      + (f", {len(done)} finished in earlier rounds" if done else ""))


class _State:
    reports: dict[str, list] = {}
    timer: threading.Timer | None = None
    stop_reason: str | None = None


def pytest_collectreport(report):
    if report.failed:
        cfg = _CONFIG[0]
        if cfg is not None:
            _record(cfg.getoption("--progress"), {"nodeid": report.nodeid or "<collection>", "outcome": "error",
                                                  "when": "collect", "duration": 0.0,
                                                  "message": str(report.longrepr)[-4000:]})


_CONFIG = [None]


def pytest_configure(config):
    _CONFIG[0] = config


def pytest_runtest_logstart(nodeid, location):
    cfg = _CONFIG[0]
    _record(cfg.getoption("--progress"), {"start": nodeid, "t": time.time()})
    limit = cfg.getoption("--watchdog")
    if limit:
        def fire():
            import faulthandler
            _record(cfg.getoption("--progress"), {"nodeid": nodeid, "outcome": "error", "when": "timeout",
                                                  "duration": limit,
                                                  "message": f"per-test limit of {limit:g} s exceeded (watchdog)"})
            capman = cfg.pluginmanager.getplugin("capturemanager")
            if capman is not None:  # else the message would go to the capture file, lost at exit
                capman.suspend_global_capture(in_=True)
            sys.stderr.write(f"\n+++ gpu_tests watchdog: {nodeid} exceeded {limit:g} s; stacks:\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(3)
        _State.timer = threading.Timer(limit, fire)
        _State.timer.daemon = True
        _State.timer.start()


def pytest_runtest_logreport(report):
    _State.reports.setdefault(report.nodeid, []).append(report)
    if report.failed and _CONFIG[0].getoption("--stop-on-cuda-error") and STICKY_CUDA.search(str(report.longrepr)):
        _State.stop_reason = f"sticky CUDA error in {report.nodeid}: a fresh process runs the rest"


def pytest_runtest_logfinish(nodeid, location):
    if _State.timer is not None:
        _State.timer.cancel()
        _State.timer = None
    reps = _State.reports.pop(nodeid, [])
    outcome, msg, when = "passed", "", "call"
    for r in reps:
        if r.failed:
            outcome, when = ("failed" if r.when == "call" else "error"), r.when
            msg = str(r.longrepr)
            break
        if r.skipped:
            xf = getattr(r, "wasxfail", None)
            outcome, when = ("xfailed" if xf is not None else "skipped"), r.when
            msg = xf if xf is not None else (r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr))
    if outcome == "passed" and any(getattr(r, "wasxfail", None) is not None for r in reps):
        outcome = "xpassed"
    _record(_CONFIG[0].getoption("--progress"),
            {"nodeid": nodeid, "outcome": outcome, "when": when,
             "duration": round(sum(r.duration for r in reps), 3), "message": msg[-4000:]})
    if _State.stop_reason:
        session = getattr(_CONFIG[0], "_gpu_tests_session", None)
        if session is not None:
            session.shouldstop = _State.stop_reason


def pytest_sessionstart(session):
    session.config._gpu_tests_session = session


# ------------------------------------------------------------------------------ driver
def _read(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                pass
    return out


def summarize(path: str) -> dict:
    """Per-test final outcome (the last one recorded), the selection, and the test left in flight."""
    results: dict[str, dict] = {}
    selected: list[str] = []
    collected = None
    started = None
    for rec in _read(path) if os.path.exists(path) else []:
        if "collected" in rec:
            collected = rec
            selected = list(dict.fromkeys(selected + rec["selected"]))
        elif "start" in rec:
            started = rec["start"]
        elif "outcome" in rec:
            results[rec["nodeid"]] = rec
            if rec["nodeid"] == started:
                started = None
    in_flight = started if started is not None and started not in results else None
    return {"results": results, "selected": selected, "collected": collected, "in_flight": in_flight}


def render_xml(progress: str, xml: str) -> dict:
    """Writes the JUnit XML of everything recorded so far; returns the counts by outcome."""
    s = summarize(progress)
    counts: dict[str, int] = {}
    cases = []
    for nodeid, r in s["results"].items():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        path, _, name = nodeid.partition("::")
        cls = path.replace("/", ".").removesuffix(".py")
        body = ""
        msg = escape(r.get("message", ""))
        if r["outcome"] == "failed":
            body = f"<failure message={quoteattr(r.get('message', '')[:200])}>{msg}</failure>"
        elif r["outcome"] == "error":
            body = f"<error message={quoteattr(r.get('when', '') + ': ' + r.get('message', '')[:200])}>{msg}</error>"
        elif r["outcome"] in ("skipped", "xfailed"):
            body = f"<skipped message={quoteattr(r.get('message', '')[:500])}/>"
        cases.append(f'  <testcase classname={quoteattr(cls)} name={quoteattr(name or path)} '
                     f'time="{r.get("duration", 0):.3f}">{body}</testcase>')
    not_run = [n for n in s["selected"] if n not in s["results"]]
    counts["not_run"] = len(not_run)
    for nodeid in not_run:  # selected but never reached (budget spent): listed, so nothing vanishes
        path, _, name = nodeid.partition("::")
        cases.append(f'  <testcase classname={quoteattr(path.replace("/", ".").removesuffix(".py"))} '
                     f'name={quoteattr(name)} time="0"><skipped message="not run: the stage budget ran out"/></testcase>')
    n_fail, n_err = counts.get("failed", 0), counts.get("error", 0)
    n_skip = counts.get("skipped", 0) + counts.get("xfailed", 0) + len(not_run)
    tmp = xml + ".tmp"
    with open(tmp, "w") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n')
        f.write(f'<testsuite name="fused_adv CUDA cases" tests="{len(cases)}" failures="{n_fail}" '
                f'errors="{n_err}" skipped="{n_skip}">\n')
        f.write("\n".join(cases) + "\n</testsuite>\n</testsuites>\n")
    os.replace(tmp, xml)
    return counts


def drive(args, pytest_args: list[str]) -> int:
    deadline = time.time() + args.budget
    child: list[subprocess.Popen | None] = [None]

    def on_term(signum, frame):
        p = child[0]
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
        counts = render_xml(args.progress, args.xml)
        with open(args.log, "a") as log:
            log.write(f"\n+++ gpu_tests: stopped by signal {signum}; results so far: {counts}\n")
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    rounds, last_done = 0, -1
    rc = 0
    while True:
        rounds += 1
        left = deadline - time.time()
        if left < 5:
            break
        cmd = [sys.executable, "-m", "pytest", "-p", "gpu_tests", "--progress", args.progress, "--done",
               args.progress, "--continue-on-collection-errors", *pytest_args]
        with open(args.log, "a") as log:
            log.write(f"\n+++ gpu_tests round {rounds} ({left:.0f} s left): {' '.join(cmd)}\n")
            log.flush()
            child[0] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                rc = child[0].wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                child[0].terminate()
                try:
                    child[0].wait(5)
                except subprocess.TimeoutExpired:
                    child[0].kill()
                rc = 124
            child[0] = None
        s = summarize(args.progress)
        if s["in_flight"] is not None:  # the process died inside a test: timeout, crash
            _record(args.progress, {"nodeid": s["in_flight"], "outcome": "error", "when": "crash",
                                    "duration": 0.0,
                                    "message": f"the test process ended inside this test (exit code {rc}): "
                                               "per-test timeout, crash or kill; see tests.log"})
            s = summarize(args.progress)
        counts = render_xml(args.progress, args.xml)
        with open(args.log, "a") as log:
            log.write(f"+++ gpu_tests round {rounds} ended (exit {rc}); results so far: {counts}\n")
        remaining = [n for n in s["selected"] if n not in s["results"]]
        if not remaining or rc == 124 or len(s["results"]) == last_done or rounds >= args.max_rounds:
            break
        last_done = len(s["results"])
    counts = render_xml(args.progress, args.xml)
    bad = counts.get("failed", 0) + counts.get("error", 0)
    print(f"gpu_tests: {counts}")
    return 124 if rc == 124 else (1 if bad or counts.get("not_run") else 0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--progress", required=True)
    p.add_argument("--xml", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--budget", type=float, default=150.0, help="seconds for all rounds together")
    p.add_argument("--max-rounds", type=int, default=8)
    p.add_argument("--render", action="store_true", help="only rewrite the XML from the progress file")
    args = p.parse_args(argv)
    if args.render:
        print(f"gpu_tests: {render_xml(args.progress, args.xml)}")
        return 0
    return drive(args, pytest_args)


if __name__ == "__main__":
    raise SystemExit(main())
