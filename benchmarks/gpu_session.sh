#!/usr/bin/env bash
# Device calls of the GPU machine (docs/perf.md, docs/accuracy.md).
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
  # 1. LSA variants at 4K, budget 0.1
  for v in "default:" "perlayer:--per-layer" "alllayers:--target-layers $(seq -s, 0 29)" \
           "indexerfirst:--first-plan indexer" "pages4:--page-blocks 4"; do
    name=${v%%:*}; flags=${v#*:}
    timeout 120 python3 -m engine.cli eval $common --tasks niah --contexts 4096 --policies lsa --budgets 0.1 \
      $flags --out /tmp/ev_$name > /tmp/ev_$name.log 2>&1
    echo "== variant $name: $(python3 -c "import json;d=json.load(open('/tmp/ev_$name/results.json'));print([(a['policy'], a['n'], a['accuracy'], round(a['kv'].get('device_kv_fraction',0),3)) for a in d['aggregates'] if a['context']=='all'])" 2>&1 | tail -1)"
  done
  for f in /tmp/ev_*/results.md; do echo "## $(basename $(dirname $f))"; cat $f; done > $OUT/variants.md
  # 2. main grid at budget 0.1
  timeout 330 python3 -m engine.cli eval $common --tasks niah,multikey,agreement,ppl --contexts 4096,8192 \
    --policies full,lsa,quest,streaming,snapkv,oracle --budgets 0.1 --out $OUT/main 2>&1 | tail -3
  # 3. budget sweep for the plot
  timeout 150 python3 -m engine.cli eval $common --tasks niah --contexts 4096 --depths 0.1,0.5,0.9 \
    --policies full,lsa,quest,streaming,snapkv,oracle --budgets 0.05,0.1,0.2 --out $OUT/sweep 2>&1 | tail -3
  ;;
esac
