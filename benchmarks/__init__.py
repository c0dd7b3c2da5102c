"""The pytest-benchmark suite and the benchmark scripts (their code lives in fused_adv/_bench).

A package so that pytest imports benchmarks/conftest.py as ``benchmarks.conftest``: the test
modules under tests/ import their backend-fixture factory with ``from conftest import ...``,
which must find tests/conftest.py when both folders are collected in one run.
"""
