"""The benchmark parameter sets (BERT-base/large, DeBERTa-v3-large, 128k embeddings, CPU-sized
sets).  The registry itself lives in fused_adv/_bench/shapes.py so that ``fused-adv bench``
works from an installed package; this module is its name under benchmarks/."""
from fused_adv._bench.shapes import *  # noqa: F401,F403
from fused_adv._bench.shapes import (CPU_DEFAULT, DTYPES, GPU_DEFAULT, SHAPE_SETS, SMOKE,  # noqa: F401
                                     NoOpOptimizer, ParamModel, ShapeSet, bert_params, deberta_v2_params,
                                     dtype_name)
