"""FGM, FGSM, PGD-3 and AWP bookkeeping per provider (pytest-benchmark).

    pytest benchmarks --benchmark-only                        # timed (CPU: tiny BERT, MiniLM)
    FUSED_ADV_BENCH_SETS=bert-large:bf16 pytest benchmarks --benchmark-only --benchmark-group-by=group
    pytest benchmarks --benchmark-disable                     # every body once, untimed (CI)

Each test times one bookkeeping step (see fused_adv/_bench/providers.py) with the untimed reset and, on GPU, an
L2 flush in pytest-benchmark's ``setup``; ``extra_info`` carries the minimum bytes, achieved
GB/s, % of the copy bandwidth measured in the same session, peak extra memory and host syncs
(``fused-adv bench`` prints the same matrix as a table).  After timing, every perturbed
parameter must equal its value before the first step, bit for bit (restore is exact), and on
GPU the fused providers and the foreach rewrite must make zero host syncs per step.
"""
import os

import pytest
import torch

from fused_adv._bench import measure
from fused_adv._bench.providers import PROVIDERS, build_case
from fused_adv._bench.shapes import CPU_DEFAULT, DTYPES, GPU_DEFAULT, SHAPE_SETS, SMOKE, ParamModel, dtype_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sets():
    spec = os.environ.get("FUSED_ADV_BENCH_SETS")
    if spec:
        out = []
        for item in spec.split(","):
            name, _, dt = item.strip().partition(":")
            out.append((name, DTYPES[dt or "fp32"]))
        return out
    # CPU: the toy set keeps the untimed CI pass quick; the CPU defaults are what gets timed.
    return GPU_DEFAULT if DEVICE.type == "cuda" else SMOKE + CPU_DEFAULT


SETS = _sets()
METHODS = measure.METHODS
_MODELS: dict = {}
_COPY: dict = {}


def _model(set_name, dtype):
    key = (set_name, dtype)
    if key not in _MODELS:
        _MODELS.clear()  # one parameter set alive at a time (the GPU sets are GBs)
        _MODELS[key] = ParamModel(SHAPE_SETS[set_name], dtype, DEVICE)
    return _MODELS[key]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("set_dtype", SETS, ids=[f"{n}-{dtype_name(d)}" for n, d in SETS])
def test_bookkeeping(benchmark, set_dtype, method, provider):
    set_name, dtype = set_dtype
    prov = PROVIDERS[provider]
    why = prov.why_not(DEVICE, method)
    if why:
        pytest.skip(f"{provider}: {why}")
    if getattr(benchmark, "disabled", False) and DEVICE.type == "cpu" and (set_name, dtype) not in SMOKE:
        pytest.skip("untimed pass (--benchmark-disable) on CPU: the toy set checks the bodies")
    model = _model(set_name, dtype)
    shape_set = SHAPE_SETS[set_name]
    pattern = measure.METHOD_PATTERN[method]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if pattern in n}
    case = build_case(method, prov, model)
    flush = measure._L2Flusher(DEVICE)

    def setup():
        if case.reset is not None:
            case.reset()
        flush()

    def target():
        case.step()
        measure.synchronize(DEVICE)

    benchmark.group = f"{measure.METHOD_LABELS[method]} {set_name}/{dtype_name(dtype)}"
    rounds = 20 if DEVICE.type == "cuda" else 5
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    if case.reset is not None:
        case.reset()

    # restore is exact: what the step perturbed is back, bit for bit (the paper's AWP subtracts
    # gamma*diff again: back up to rounding, by design)
    for n, p in model.named_parameters():
        if n in before:
            if measure.RESTORE_EXACT[method]:
                assert torch.equal(p.detach(), before[n]), f"{provider} {method}: {n} not restored exactly"
            else:  # two roundings at the scale of w and of gamma*diff (|diff| <= ||w|| <= sqrt(numel)*max|w|)
                eps = torch.finfo(p.dtype).eps
                scale = before[n].abs().max().item() * (1 + 0.01 * p.numel() ** 0.5)
                err = (p.detach().double() - before[n].double()).abs().max().item()
                assert err <= 4 * eps * scale, f"{provider} {method}: {n} off by {err:.3g}"

    mbytes = measure.min_bytes(method, shape_set, dtype)
    info = {"min_bytes": mbytes, "perturbed_params": measure.perturbed_numel(method, shape_set),
            "device": str(DEVICE)}
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:  # not under --benchmark-disable
        med = stats.stats.median
        key = (measure.perturbed_numel(method, shape_set), dtype)
        if key not in _COPY:
            _COPY[key] = measure.copy_bandwidth(key[0], dtype, DEVICE, max_seconds=2.0)
        info["gbps"] = mbytes / med / 1e9
        info["pct_copy"] = 100 * (mbytes / med) / _COPY[key]
        info["extra_mem_bytes"] = measure.peak_extra_memory(build_case(method, prov, model), model, DEVICE)
    syncs = measure.count_host_syncs(case.step, DEVICE)
    if case.reset is not None:
        case.reset()
    info["host_syncs"] = syncs
    benchmark.extra_info.update(info)
    if DEVICE.type == "cuda" and prov.kind in ("fused", "foreach"):
        assert syncs == 0, f"{provider} {method} made {syncs} host syncs per step (target: 0)"
