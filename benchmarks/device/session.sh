#!/usr/bin/env bash
# The device calls of a session, by phase (run there, after setup.sh receive N and env.sh):
#   bash benchmarks/device/session.sh early    step profile (512K/128K), tiny-random served on CUDA, bench 128K
#   bash benchmarks/device/session.sh floor    issue 13 (~5 min): CUDA tests of the floor branch, step profile,
#                                              bench decode 128K/512K batch 1, 128K at max batch (fp8 vs int4)
#   bash benchmarks/device/session.sh floor-eval   issue 13 (~2 min): SmolLM2 ppl / NIAH / agreement, LSA over the
#                                              bf16, fp8 and int4 mirrors
# Every phase writes JSON and logs under $OUT and prints a short summary last.
set -uo pipefail
phase=${1:?phase}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, ray; print('torch', torch.__version__, 'triton', triton.__version__, 'ray', ray.__version__)" | tee -a "$OUT/gpu.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$OUT/gpu.txt"

serve_start() {  # port, then key=value args; the server runs in its own process group
  local port=$1; shift
  setsid python3 -m cli serve "$@" --port "$port" > "$OUT/serve_$port.log" 2>&1 &
  echo $! > "/tmp/serve_$port.pid"
  for i in $(seq 1 90); do
    sleep 2
    curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && { echo "server on $port up after $((i * 2)) s"; return 0; }
  done
  echo "server on $port did not come up"; tail -30 "$OUT/serve_$port.log"; return 1
}

serve_stop() {
  local port=$1 pid
  pid=$(cat "/tmp/serve_$port.pid")
  kill -TERM -"$pid" 2>/dev/null
  for i in $(seq 1 20); do sleep 1; kill -0 "$pid" 2>/dev/null || break; done
  kill -0 "$pid" 2>/dev/null && { echo "server $port ignored SIGTERM for 20 s: killed"; kill -KILL -"$pid"; }
  ls /dev/shm | grep -c lsa-kv | sed 's/^/arena files left in \/dev\/shm: /'
  grep -ciE "traceback|error" "$OUT/serve_$port.log" | sed "s/^/error lines in the server log: /"
}

case $phase in
early)
  timeout 300 python3 -m benchmarks.profile_step --contexts 131072 524288 --steps 32 \
    --out "$OUT/profile_step.json" 2>&1 | grep -v Warning | tee "$OUT/profile_step.log"
  if serve_start 8011 model=tiny-random device=cuda worker_num_gpus=1 policy=lsa kv_store_bytes=2000000000; then
    timeout 150 python3 benchmarks/device/served_smoke.py http://127.0.0.1:8011 "$OUT/served_smoke.json" 2>&1 | tail -20
    serve_stop 8011
  fi
  timeout 200 python3 -m cli bench decode --contexts 131072 --batch 1 --rounds 3 --steps 32 \
    --out "$OUT/bench_decode_128k.json" 2>&1 | grep -v built | tail -8
  ;;
floor)
  # Every command output also goes to floor.log; JSON: profile_step, bench_decode_b1, bench_decode_max (6 files).
  exec > >(tee -a "$OUT/floor.log") 2>&1
  t0=$SECONDS
  # FLOOR_REHEARSE=1: the same commands at tiny shapes on the CPU (a rehearsal off the device; tests
  # collected only, time limits x5 for a CPU shared with other work)
  shapes="" ctx="131072 524288" ctx_max=131072 win1="--rounds 2 --steps 64" win2="--rounds 2 --steps 32" cap="" collect="" slow=1 psteps=32
  [ -n "${FLOOR_REHEARSE:-}" ] && shapes="--config tiny --layers 2 --device cpu" ctx="8192 16384" ctx_max=8192 \
    win1="--rounds 1 --steps 12 --cycle 8" win2="--rounds 1 --steps 8 --cycle 8" cap="--max-batch 3" collect="--collect-only" psteps=4 \
    slow=5
  # 1. the CUDA side of what changed: load_blocks (bf16 / fp16 on the GPU), the int4 mirror in the engine,
  #    fused projections vs transformers, CUDA graphs, budget 1.0 = full attention
  timeout $((90 * slow)) python3 -m pytest -q -x -p no:warnings $collect tests/test_kernels_block_load.py tests/test_int4_mirror.py \
    tests/test_host_mirror.py tests/test_fp8_mirror.py tests/test_model_parity.py tests/test_graphs.py \
    "tests/test_policies.py::test_lsa_with_full_budget_equals_full_attention" > "$OUT/floor_tests.log" 2>&1
  echo "tests rc=$? ($((SECONDS - t0)) s):"; grep -E "^E |FAILED|passed|failed" "$OUT/floor_tests.log" | head -12
  # 2. where the step's time goes now (random KV, as the 2026-12-01 profile), against its floor
  timeout $((100 * slow)) python3 -m benchmarks.profile_step --contexts $ctx --steps $psteps $shapes \
    --out "$OUT/profile_step.json" 2>&1 | grep -v Warning
  echo "profile done ($((SECONDS - t0)) s)"
  # 3. batch 1, full vs lsa 0.10 alive together, plans churning like real text (a third of the set per cycle)
  timeout $((110 * slow)) python3 -m cli bench decode --contexts $ctx --batch 1 --rhos 0.1 --churn 0.33 $shapes $win1 \
    --out "$OUT/bench_decode_b1.json" 2>&1 | grep -v built | tail -6
  echo "batch 1 done ($((SECONDS - t0)) s)"
  # 4. 128K at each policy's largest batch: full (GPU memory), lsa over the fp8 and the int4 mirror (host RAM)
  timeout $((130 * slow)) python3 -m cli bench decode --contexts $ctx_max --batch max --rhos 0.1 --churn 0.33 $shapes \
    --host-dtype fp8 int4 $win2 $cap --out "$OUT/bench_decode_max.json" 2>&1 | grep -v built | tail -6
  echo "floor phase done in $((SECONDS - t0)) s"
  ;;
floor-eval)
  # Issue 13, the int4 mirror's accuracy cost against the bf16 and FP8 mirrors (~2 min): SmolLM2, LSA 0.10,
  # cycle 16 (so that blocks come back from the mirror every 16 tokens), ppl / NIAH / agreement at 4K. The three
  # runs share the GPU at once (a 135M model; accuracy, not speed, is measured here).
  # JSON: eval_{model,fp8,int4}.json (results.json of each run) and floor_eval.log.
  exec > >(tee -a "$OUT/floor_eval.log") 2>&1
  t0=$SECONDS
  # FLOOR_REHEARSE=1: 1K context, 32 ppl tokens, on the CPU (a rehearsal off the device)
  grid="--contexts 4096 --limit 2 --ppl-tokens 128"
  [ -n "${FLOOR_REHEARSE:-}" ] && grid="--contexts 1024 --limit 1 --ppl-tokens 32 --agreement-tokens 8 --device cpu"
  for fmt in model fp8 int4; do
    extra=""; [ "$fmt" != model ] && extra="--host-dtype $fmt"
    timeout 170 python3 -m cli eval --model "${LSA_MODEL:-smollm2-135m}" --tasks ppl,niah,agreement --policies lsa \
      --budgets 0.1 $grid --depths 0.1,0.5,0.9 --max-tokens 24 \
      --block-size 16 --cycle 16 --prefill-chunk 4096 $extra --out "/tmp/floor_eval_$fmt" --quiet \
      > "/tmp/floor_eval_$fmt.log" 2>&1 &
  done
  wait
  for fmt in model fp8 int4; do
    tail -3 "/tmp/floor_eval_$fmt.log" | sed "s/^/$fmt: /"
    cp "/tmp/floor_eval_$fmt/results.json" "$OUT/eval_$fmt.json" 2>/dev/null
    grep -A6 "^### " "/tmp/floor_eval_$fmt/results.md" 2>/dev/null | grep -E "^\| lsa" | sed "s/^/$fmt: /"
  done
  echo "floor-eval done in $((SECONDS - t0)) s"
  ;;
*)
  echo "unknown phase $phase"; exit 2 ;;
esac
