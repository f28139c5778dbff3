#!/usr/bin/env bash
# One run of the GPU checks on a lent NVIDIA machine (the device tool), within its 15 minutes:
# the CUDA tests on the real GPU, then CUDA vs CPU parity and tokens/s on 0.6B / 1.7B-shaped
# random Q8_0 and Q4_K_M files made there. That machine has python3 with numba, numba-cuda,
# numpy, typer, rich, jinja2, tokenizers, safetensors and torch, but no network: the rest
# travels as wheels. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gguf==0.19.0 prompt_toolkit wcwidth openai
# then run `bash scripts/gpu_session.sh` with carry [".whl"] and timeout_s 600; the log is in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_session.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "from numba import cuda; print('numba-cuda sees', cuda.get_current_device().name)" || exit 1
QWEN3CLI_TEST_GPU=1 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15
timeout 400 python3 - <<'PY'
import sys, time
from pathlib import Path
sys.path.insert(0, "scripts")
from bench_quantize import QWEN3_06B, QWEN3_17B, write_checkpoint
from qwen3cli.io.convert import quantize
work = Path("/tmp/qwen3bench")
for name, shape in (("0.6b", QWEN3_06B), ("1.7b", QWEN3_17B)):
    src = work / f"Qwen3-{name}-random"
    if not src.exists():
        write_checkpoint(src, shape)
    for t in ("q8_0", "q4_k_m"):
        t0 = time.time()
        quantize(src, work / f"qwen3-{name}-{t}.gguf", t, force=True)
        print(f"made {name} {t} in {time.time() - t0:.0f} s", flush=True)
PY
timeout 400 python3 scripts/bench_gpu.py /tmp/qwen3bench/qwen3-0.6b-q8_0.gguf /tmp/qwen3bench/qwen3-0.6b-q4_k_m.gguf \
    /tmp/qwen3bench/qwen3-1.7b-q8_0.gguf /tmp/qwen3bench/qwen3-1.7b-q4_k_m.gguf -p 128 -n 64 --reps 2
