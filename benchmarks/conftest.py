"""pytest-benchmark suite configuration.

The suite is skipped in the normal test run (``--benchmark-skip`` in pyproject's addopts); run it
with ``pytest benchmarks --benchmark-only`` (timed) or ``pytest benchmarks --benchmark-disable``
(each body once, untimed: what CI does to keep it from rotting).  ``FUSED_ADV_BENCH_SETS``
chooses the parameter sets, e.g. ``bert-large:bf16,emb-128k-4096:bf16``.  The benchmark code
itself (parameter sets, providers, measurements) lives in fused_adv/_bench.
"""
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # pyproject's addopts carries --benchmark-skip so that a plain `pytest` skips this suite, and
    # pytest-benchmark lets skip win over --benchmark-disable.  An explicit --benchmark-disable
    # means "run every body once, untimed" (the CI smoke pass), so it lifts the skip (before the
    # plugin marks the items).
    session = getattr(config, "_benchmarksession", None)
    if session is not None and session.disabled and config.getoption("benchmark_disable", False):
        session.skip = False
