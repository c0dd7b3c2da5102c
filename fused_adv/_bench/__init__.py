"""Benchmark machinery shared by ``fused-adv bench`` and the pytest-benchmark suite (benchmarks/).

It lives inside the package so that the console script works from an installed wheel;
benchmarks/shapes.py and benchmarks/providers.py re-export it for the pytest suite.

* :mod:`fused_adv._bench.shapes`    parameter sets (names + shapes) and a stand-in model for them
* :mod:`fused_adv._bench.providers` who runs the bookkeeping: community reference,
  torch.compile(reference), and the fused classes on each backend
* :mod:`fused_adv._bench.measure`   timing, copy bandwidth, minimum bytes, peak extra memory,
  host syncs
"""
