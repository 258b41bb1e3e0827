#!/usr/bin/env bash
# One device call of the GPU machine (see docs/perf.md): phase "check" runs the CUDA tests and the
# engine decode benchmark; phase "eval" runs `lsa eval` on SmolLM2 (GGUF carried in two parts).
# Usage on the device: bash benchmarks/gpu_session.sh check|eval [eval args...]
set -uo pipefail
phase=$1; shift
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case $phase in
check)
  [ -d .gguf_a ] && cp .gguf_a/* /tmp/
  python3 -m pytest -q -x tests/test_model_parity.py tests/test_policies.py 2>&1 | tee $OUT/tests.log | tail -15
  python3 -m benchmarks.engine_decode --context 8192 --batch 1 16 --out $OUT/engine_decode.json 2>&1 | tee $OUT/bench.log
  ;;
eval)
  mkdir -p /tmp/smollm2 && cat /tmp/ggsplit_aa .gguf_b/ggsplit_ab > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  md5sum /tmp/smollm2/*.gguf
  python3 -m engine.cli eval --model /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --haystack .hay --out $OUT/eval "$@" 2>&1 | tail -60
  ;;
esac
