"""The one home of the benchmark code, shared by ``fused-adv bench`` (fused_adv/bench.py), the
pytest-benchmark suite (benchmarks/test_bench_weight.py) and the scripts under benchmarks/.

It lives inside the package so that the console script works from an installed wheel;
benchmarks/ holds only entry files that import it.

* :mod:`fused_adv._bench.shapes`          parameter sets (names + shapes) and a stand-in model for them
* :mod:`fused_adv._bench.providers`       who runs the bookkeeping: community reference,
  torch.compile(reference), the torch._foreach_* rewrite, and the fused classes on each backend
* :mod:`fused_adv._bench.foreach`         the torch._foreach_* rewrite of FGM / FGSM / PGD / AWP
* :mod:`fused_adv._bench.measure`         timing, copy bandwidth, minimum bytes, peak extra memory,
  host syncs
* :mod:`fused_adv._bench.matrix`          the ``fused-adv bench`` matrix: run, format, write, plot
* :mod:`fused_adv._bench.report`          tables and run metadata (also used by ``fused-adv demo``)
* :mod:`fused_adv._bench.bookkeeping_cpu` interleaved CPU comparison on a BERT-shaped model
  (``python benchmarks/bookkeeping_cpu.py``)
* :mod:`fused_adv._bench.activation_cpu`  the activation-space ops against their reference code
  (``python benchmarks/bench_activation_cpu.py``)
* :mod:`fused_adv._bench.trainer_overhead` where an HF Trainer step with fused AWP spends its time
  against the plain step (``python -m fused_adv._bench.trainer_overhead``)
"""
