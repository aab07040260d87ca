#!/usr/bin/env bash
# The CUDA checks for a lent GPU (issue 3), about 3-5 minutes; never run in CI.
#
#   bench/gpu.sh wheels   # here, on the dev machine: fetch the Python packages the GPU image lacks
#   bench/gpu.sh          # there, from the repo root (device tool: carry [".whl"]); about 10 minutes
#   bench/gpu.sh text     # only 1 and 2 (5 minutes at most); `bench/gpu.sh images`: only 3 (7 at most)
#
# 1. the CUDA tests (tests/engine/test_cuda.py: greedy on "cuda" equals the CPU engine's),
# 2. bench/gpu_bench.py: Llama-3.2-1B-shaped random bf16 model, budrt vs transformers decode tok/s
#    at batch 1 and 32, and decode bandwidth as a fraction of the card's copy rate,
# 3. tests/test_image_cuda.py (tiny SD 1.x, SDXL, SD3, FLUX: seeded pictures as their pipelines'
#    own on CUDA) and bench/image_gpu.py: an SD 1.5-shaped random pipeline at 512x512, the
#    diffusion engine at 8 clients vs the pipeline one request at a time (issue 17).
# Results go to $OUT (the device tool's output folder) or bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# What budrt imports that the GPU image (torch, transformers, tokenizers, httpx, pytest...) lacks.
WHEELS="pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 annotated-types==0.8.0
typing-inspection==0.4.5 python-dotenv==1.2.4 gguf==0.19.0 diffusers==0.42.1"

if [ "${1:-}" = "wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # shellcheck disable=SC2086
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
fi

export PYTHONPATH=src:.:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
imports() {
  "$PYTHON" -c "import budrt.engine.factory, budrt.image.engine, tests.tiny_models" 2>"$RESULTS/import_error.txt"
}

if ! imports && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU image: add the carried wheels
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if ! imports; then
  echo "budrt does not import here (run 'bench/gpu.sh wheels' on the dev machine, carry .whl):"
  cat "$RESULTS/import_error.txt"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee "$RESULTS/gpu.txt"

status=0
part=${1:-all}
if [ "$part" != images ]; then
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/engine/test_cuda.py 2>&1 \
  | tee "$RESULTS/gpu_tests.txt" || status=1
timeout 330 "$PYTHON" bench/gpu_bench.py --batches 1 32 --new-tokens 128 --json "$RESULTS/gpu_bench.json" 2>&1 \
  | grep -v '^{"ts"' | tee "$RESULTS/gpu_bench.txt" || status=1
fi
if [ "$part" != text ]; then
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_image_cuda.py 2>&1 \
  | tee "$RESULTS/image_cuda_tests.txt" || status=1
timeout 300 "$PYTHON" bench/image_gpu.py --device cuda --json "$RESULTS/image_gpu.json" 2>&1 \
  | tee "$RESULTS/image_gpu.txt" || status=1
fi
exit $status
