#!/usr/bin/env bash
# Device calls of the GPU machine (docs/perf.md, docs/accuracy.md).
#   bash benchmarks/gpu_session.sh graphs  CUDA-graph tests, graph vs eager decode, full vs lsa at 128K/512K
#   bash benchmarks/gpu_session.sh decode1 CUDA tests; lsa bench decode at 128K and 512K, batch 1
#   bash benchmarks/gpu_session.sh decode2 lsa bench decode at 1M (FP8 mirror) and 128K at the largest batch
#   bash benchmarks/gpu_session.sh check   CUDA tests + engine decode benchmark; stashes GGUF part 1 in /tmp
#   bash benchmarks/gpu_session.sh eval    `lsa eval` grids on SmolLM2 (GGUF part 2 carried; must follow
#                                          a check call while the machine is warm)
# Carried: .whl (the gguf wheel), .gguf_a / .gguf_b (the embedded GGUF split in two, each < 64 MiB),
# .hay (a copy of ../shared/data/haystack, which does not travel).
set -uo pipefail
phase=$1; shift
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case $phase in
graphs)
  timeout 240 python3 -m pytest -q -x tests/test_graphs.py tests/test_policies.py tests/test_fp8_mirror.py 2>&1 | tee $OUT/tests.log | tail -6
  timeout 150 python3 -m benchmarks.engine_decode --context 8192 --batch 1 16 --out $OUT/engine_decode.json 2>&1 | tee $OUT/engine_decode.log
  timeout 300 python3 -m cli bench decode --contexts 131072 524288 --batch 1 --steps 32 --rounds 3 \
    --out $OUT/bench_decode.json 2>&1 | tee $OUT/bench_decode.log
  ;;
final1)
  md5sum tests/test_policies.py engine/policies/lsa.py
  timeout 170 python3 -m pytest -q -x tests/test_kernels_fused.py tests/test_model_parity.py tests/test_graphs.py tests/test_policies.py tests/test_fp8_mirror.py 2>&1 | tee $OUT/tests.log | tail -4
  timeout 100 python3 -m benchmarks.engine_decode --context 8192 --batch 1 16 --repeats 3 --out $OUT/engine_decode.json 2>&1 | tail -5
  timeout 200 python3 -m cli bench decode --contexts 131072 524288 --batch 1 \
    --out $OUT/bench_decode_512k.json 2>&1 | tee $OUT/bench_decode_512k.log | grep -v built
  timeout 150 python3 -m cli bench decode --contexts 1048576 --batch 1 --host-dtype fp8 --rounds 2 \
    --out $OUT/bench_decode_1m.json 2>&1 | tee $OUT/bench_decode_1m.log | grep -v built
  ;;
final2)
  cp .gguf_a/* /tmp/ 2>/dev/null
  timeout 60 python3 -m pytest -q -x tests/test_graphs.py 2>&1 | tail -2
  timeout 280 python3 -m cli bench decode --contexts 131072 --batch max --host-dtype fp8 --rounds 2 \
    --out $OUT/bench_decode_128k_max.json 2>&1 | tee $OUT/bench_decode_128k_max.log | grep -v built
  ;;
eval2)
  mkdir -p /tmp/smollm2 && cat /tmp/ggsplit_aa .gguf_b/ggsplit_ab > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  M=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  common="--model $M --haystack .hay --block-size 16 --quiet --tasks niah --depths 0.1,0.3,0.5,0.7,0.9 --limit 3 --max-tokens 24 --prefill-chunk 8192 --budgets 0.1"
  for ctx in 4096 8192; do
    timeout 150 python3 -m cli eval $common --contexts $ctx --policies full,lsa,quest,streaming,snapkv,oracle \
      --out $OUT/niah$ctx 2>&1 | tail -2
    cat $OUT/niah$ctx/results.md 2>/dev/null | head -20
  done
  timeout 60 python3 -m cli eval $common --contexts 8192 --policies lsa --host-dtype fp8 --out $OUT/niahfp8 2>&1 | tail -2
  cat $OUT/niahfp8/results.md 2>/dev/null | head -12
  rm -f $OUT/*/*.png
  ;;
final3)
  timeout 80 python3 -m pytest -q -x tests/test_graphs.py tests/test_policies.py 2>&1 | grep -E "^E |FAILED|passed|failed" | head -12
  timeout 280 python3 -m cli bench decode --contexts 131072 --batch max --host-dtype fp8 --rounds 2 --steps 32 \
    --out $OUT/bench_decode_128k_max.json 2>&1 | tee $OUT/bench_decode_128k_max.log
  ;;
decode1)
  timeout 200 python3 -m pytest -q -x tests/test_graphs.py tests/test_policies.py tests/test_fp8_mirror.py 2>&1 | tee $OUT/tests.log | tail -4
  timeout 380 python3 -m cli bench decode --contexts 131072 524288 --batch 1 \
    --out $OUT/bench_decode_512k.json 2>&1 | tee $OUT/bench_decode_512k.log
  ;;
decode2)
  timeout 280 python3 -m cli bench decode --contexts 1048576 --batch 1 --host-dtype fp8 \
    --out $OUT/bench_decode_1m.json 2>&1 | tee $OUT/bench_decode_1m.log
  timeout 300 python3 -m cli bench decode --contexts 131072 --batch max \
    --out $OUT/bench_decode_128k_max.json 2>&1 | tee $OUT/bench_decode_128k_max.log
  ;;
check)
  [ -d ../.gguf_a ] && cp ../.gguf_a/* /tmp/
  [ -d .gguf_a ] && cp .gguf_a/* /tmp/
  timeout 200 python3 -m pytest -q tests/test_model_parity.py tests/test_policies.py 2>&1 | tee $OUT/tests.log | tail -6
  timeout 200 python3 -m benchmarks.engine_decode --context 8192 --batch 1 16 --out $OUT/engine_decode.json 2>&1 | tee $OUT/bench.log
  ;;
eval)
  gb=.gguf_b; [ -d $gb ] || gb=../.gguf_b
  hay=.hay; [ -d $hay ] || hay=../.hay
  mkdir -p /tmp/smollm2 && cat /tmp/ggsplit_aa $gb/ggsplit_ab > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  md5sum /tmp/smollm2/*.gguf
  M=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  common="--model $M --haystack $hay --block-size 16 --quiet"
  # NIAH per policy at budget 0.1, one invocation per context so a timeout loses only one
  for ctx in 4096 8192; do
    timeout 280 python3 -m cli eval $common --tasks niah --contexts $ctx --depths 0.1,0.5,0.9 --limit 2 \
      --max-tokens 24 --prefill-chunk 4096 --policies full,lsa,quest,streaming,snapkv,oracle --budgets 0.1 \
      --out $OUT/niah$ctx 2>&1 | tail -3
    cat $OUT/niah$ctx/results.md 2>/dev/null | head -30
  done
  ;;
esac
