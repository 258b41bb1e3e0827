#!/usr/bin/env bash
# The device calls of a session, by phase (run there, after setup.sh receive N and env.sh):
#   bash benchmarks/device/session.sh early    step profile (512K/128K), tiny-random served on CUDA, bench 128K
#   bash benchmarks/device/session.sh PHASE...  the issue-15 phases, in the order given (~9 min in all):
#     prefill  (a) the Llama-3-8B-shaped random model written once (~0.5 min); its prefill at 32K/128K
#              vs the floor (~1 min; LSA_PREFILL_512K=1 adds 512K: +4 min)
#     serve    (b) that model served (FP8 host store): sessions at 32K and 128K, 2 follow-ups each,
#              LSA_SESSIONS (default 4; max: what host RAM holds) concurrent 128K sessions, then the same
#              workload on the engine alone (~4 min; each session past 4: +20 s)
#     checks   (c) SmolLM2 (the GGUF: after receive 2) answering the demo's questions, (d) worker
#              restart, (e) leak check (~1.5 min)
#     pooled   (f) host RAM pooled over two Ray nodes, sessions of LSA_POOLED_CONTEXT (131072; 32768:
#              -0.5 min) tokens (~2 min; makes the 8B model again if /tmp lost it: +0.5 min)
#     floor    issue 13 (~6 min at its limits): CUDA tests of the floor branch, step profile,
#              bench decode 128K/512K batch 1; log floor.log (FLOOR_MAX=1: floor-max too, past 10 min)
#     boundary-max issue 13 (~7 min): 128K x 24 over int4, the step profiled over 64 steps with boundaries, then
#              bench decode at batch max over int4; log boundary_max.log
#     floor-max   128K at max batch, full vs lsa over the fp8 and the int4 mirror (~5 min; its own call)
#     fused-ab    issue 13 (~5 min): the fused decode path's CUDA tests, bench decode b1 with it
#              (LSA_FUSED_DECODE=1) and without, its step profile, benchmarks/decode_linear; log fused_ab.log. FLOOR_REHEARSE=1: tiny shapes on the CPU
#     overlap  issue 13 (~7 min): overlapped decode's CUDA tests, bench decode b1 (128K, 512K) and 128K x 24 over
#              int4, each engine with and without overlap (--overlap both); log overlap.log. FLOOR_REHEARSE=1: tiny, CPU
#     gemv-ab  issue 13 (~6 min): the plain Triton GEMV (LSA_DECODE_GEMV=1) against cuBLAS, its CUDA tests, bench
#              decode b1 (128K, 512K, overlap on) alternated over GEMV_ROUNDS (2) rounds, its step profile at 128K;
#              log gemv_ab.log. FLOOR_REHEARSE=1: tiny, CPU
#     step-ab  issue 13 (~7 min at 2 variants): the step as it is against STEP_VARIANTS (benchmarks/variant.py;
#              default the step before the twelfth session), its CUDA tests, bench decode b1 (128K, 512K) alternated
#              over STEP_ROUNDS (2) rounds, its step profile at 128K; log step_ab.log. FLOOR_REHEARSE=1: tiny, CPU
#     served-gemv issue 13 (~1 min; after setup.sh receive 1): the served app (LSA, CUDA graphs) on the step's
#              kernels, 8B shapes cut to 2 layers, two rounds of served_smoke.py; log served_gemv.log
#     floor-eval  issue 13 (~2 min): SmolLM2 ppl / NIAH / agreement, LSA over the bf16, fp8 and int4
#              mirrors; log floor_eval.log. FLOOR_REHEARSE=1: both with tiny shapes on the CPU
#     index-score issue 10 (~8 min): what the exact-attention Level-1 score (index_score=attention) costs in decode
#              against the mean-key score: bench decode b1 (128K, 512K; full, lsa mean, lsa attention alternated),
#              then 128K at each one's largest batch over int4, after benchmarks/level1_probe.py (a boundary's scoring by
#              piece); log index_score.log. FLOOR_REHEARSE=1: tiny, CPU
#     served1 = prefill serve (call 1: ray only, no GGUF); served2 = checks pooled (call 2)
#     fidelity issue 10's accuracy grids on SmolLM2 (<= 7 min; docs/accuracy.md): layer plan by lsa calibrate,
#              every task at rho 0.10 (8K, 4K; essays and pydoc; n = 20 per cell), the budget sweep 0.05-0.5
#              (8K: ppl on both texts, NIAH); after receive 2 (the GGUF and the haystack)
# Every phase writes JSON and logs under $OUT and prints a short summary last; each step has a
# timeout (step NAME SECONDS command...), and $OUT/steps.txt lists every step's exit status and time.
# LSA_REHEARSE=1: the issue-15 phases with tiny shapes on the CPU, the same steps (tests/test_device_session.py).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: session.sh PHASE..."; exit 2; }
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
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

step() {  # step NAME SECONDS command...: run with a timeout (x SLOW), log to $OUT/NAME.log, record the exit status
  local name=$1 limit=$(($2 * SLOW)) t0=$SECONDS rc; shift 2
  echo "== $name (at most $limit s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  grep -v -E "Warning|warn\(|^\s*$" "$OUT/$name.log" | tail -${TAIL:-12}
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  return $rc
}

if [ "${LSA_REHEARSE:-0}" = 1 ]; then  # the served phases' steps, tiny, on the CPU
  MODEL=${TMPDIR:-/tmp}/lsa-rehearse-model SHAPE=tiny CTX="512 1024" CONC=1024 ORDINARY=512 RATE=256 CHUNK=256 SESSIONS=2 SLOW=3  # a shared CPU
  TURN_TOKENS=72  # a turn's tokens: past one LSA cycle (64), so a turn still refreshes its plan
  APP="device=cpu worker_num_gpus=0 block_size=16 torch_threads=1 worker_num_cpus=0.5 max_num_seqs=3"
  SMALL="--context-tokens 250 model=tiny-random $APP" KV_RESERVE=0 DEVICE_KV="" PORT_ARGS="--port ${LSA_PORT:-8000} --num-cpus 4"
  export LSA_KV_MAX=${LSA_KV_MAX:-268435456}
else
  MODEL=/tmp/llama3-8b-random SHAPE=llama3-8b CTX="32768 131072" CONC=131072 ORDINARY=32768 RATE=32768 CHUNK=8192 SESSIONS=4 SLOW=1
  TURN_TOKENS=128
  APP="device=cuda worker_num_gpus=1 max_num_seqs=16"
  # host RAM kept off the arena: a model load (16 GB, transient), Ray's processes, the driver
  SMALL="model=${LSA_MODEL:-smollm2-135m} $APP block_size=16 max_num_seqs=4" KV_RESERVE=${LSA_KV_RESERVE:-24e9}
  DEVICE_KV="device_kv_bytes=40000000000" PORT_ARGS=""  # the app's worker, then the engine alone: each this much
fi
APPBIG="model=$MODEL $APP policy=lsa host_dtype=fp8 prefill_chunk=$CHUNK $DEVICE_KV"

make_model() {  # the 8B-shaped model, once per machine (~30 s: drawn on the GPU, 16 GB of safetensors)
  [ -f $MODEL/config.json ] && ls $MODEL/*.safetensors > /dev/null 2>&1 && return 0
  step make_model 150 python3 -m benchmarks.make_random_model $MODEL --shape $SHAPE \
    ${LSA_TOKENIZER_DIR:+--tokenizer $LSA_TOKENIZER_DIR}  # call 1 has no GGUF yet: setup.sh's tokenizer files
}

kv_budget() {  # bytes for one node's host KV store: host RAM and /dev/shm, less what loading the model and Ray take
  python3 - "$@" <<'PY'
import os, shutil, sys
avail = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable"))
shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
reserve = float(sys.argv[1])
print(int(max(1 << 26, min(avail - reserve, shm - 8e9, float(os.environ.get("LSA_KV_MAX", "inf"))))))
PY
}

phase_prefill() {
  df -h /dev/shm | tail -1; grep -E "MemTotal|MemAvailable" /proc/meminfo
  make_model
  local big="" more=0; [ "${LSA_PREFILL_512K:-0}" = 1 ] && { big=524288; more=300; }
  step prefill $((150 + more)) python3 -m cli bench prefill --model $MODEL --contexts $CTX $big \
    --ordinary-max $ORDINARY --chunk $CHUNK --rate-tokens $RATE --out "$OUT/prefill.json"
}

phase_serve() {
  make_model
  local fit sessions kv
  read -r fit sessions kv < <(python3 -c "import sys; from benchmarks.serve import plan_store
print(*plan_store(sys.argv[4:], int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))" \
    $CONC "$(kv_budget $KV_RESERVE)" ${LSA_SESSIONS:-$SESSIONS} $APPBIG)
  [ -n "$kv" ] || { echo "serve: sizing the host KV store failed" | tee -a "$OUT/steps.txt"; return 1; }
  echo "host RAM holds $fit sessions of $CONC tokens; running $sessions in a host KV store of $kv bytes"
  # every batch's timing in the served worker and the engine alone (engine/trace.py): where a turn's time goes
  LSA_STEP_TRACE="$OUT/trace" step serve $((200 + 30 * sessions)) python3 -m cli bench serve $APPBIG kv_store_bytes=$kv --contexts $CTX \
    --followups 2 --concurrency-context $CONC --sessions $sessions --max-tokens $TURN_TOKENS $PORT_ARGS --out "$OUT/serve.json"
}

phase_checks() {  # (c) (d) (e) on one SmolLM2 app
  step checks 200 python3 benchmarks/device/served_checks.py app "$OUT/checks.json" --checks demo,restart,leaks \
    $SMALL policy=lsa kv_store_bytes=4000000000 $PORT_ARGS
}

phase_pooled() {
  make_model
  step pooled 240 python3 benchmarks/device/served_checks.py pooled "$OUT/pooled.json" \
    --context ${LSA_POOLED_CONTEXT:-$CONC} --sessions 1 --extra 1 --max-tokens $TURN_TOKENS $APPBIG $PORT_ARGS
}

phase_early() {
  timeout 300 python3 -m benchmarks.profile_step --contexts 131072 524288 --steps 32 \
    --out "$OUT/profile_step.json" 2>&1 | grep -v Warning | tee "$OUT/profile_step.log"
  if serve_start 8011 model=tiny-random device=cuda worker_num_gpus=1 policy=lsa kv_store_bytes=2000000000; then
    timeout 150 python3 benchmarks/device/served_smoke.py http://127.0.0.1:8011 "$OUT/served_smoke.json" 2>&1 | tail -20
    serve_stop 8011
  fi
  timeout 200 python3 -m cli bench decode --contexts 131072 --batch 1 --rounds 3 --steps 32 \
    --out "$OUT/bench_decode_128k.json" 2>&1 | grep -v built | tail -8
}

phase_served_gemv() {
  # the served app (cluster:app through `lsa serve`, CUDA graphs, LSA) on the step's kernels of a small decode batch
  # (the GEMVs with the rotary and the SwiGLU, PDL): Llama-3-8B shapes cut to 2 layers (~1 min in all; ray: after
  # setup.sh receive 1), two rounds of the served smoke (sessions, turns, completions, streaming).
  local m=/tmp/llama3-8b-2layers
  [ -f $m/config.json ] || step make_model_2l 120 python3 -m benchmarks.make_random_model $m --shape llama3-8b \
    --layers 2 ${LSA_TOKENIZER_DIR:+--tokenizer $LSA_TOKENIZER_DIR}
  if serve_start 8012 model=$m $APP policy=lsa kv_store_bytes=4000000000; then
    timeout 120 python3 benchmarks/device/served_smoke.py http://127.0.0.1:8012 "$OUT/served_smoke.json" 2>&1 | tail -12
    serve_stop 8012
  fi
}

phase_fidelity() {
  # $LSA_MODEL: the SmolLM2 GGUF, $LSA_HAYSTACK: the essays (env.sh sets both). Files: layer_plan.json,
  # grid/{results.json,results.md,accuracy.png}, sweep/ likewise, and the steps' logs; each eval rewrites its JSON
  # and tables after every run, so a timeout leaves what was done. LSA_BEST (a policy spec) replaces the
  # layer-plan variant; FID_* shrink the grid (docs/accuracy.md: what to cut when short, the CPU rehearsal).
  local M=${LSA_MODEL:?source env.sh first} H=${LSA_HAYSTACK:?source env.sh first} BEST POLICIES COMMON
  [ "${FID_CALIB_S:-75}" -gt 0 ] && step fid_calibrate "${FID_CALIB_S:-75}" python3 -m cli calibrate --model "$M" --texts essays,pydoc \
    --context "${FID_CALIB_CONTEXT:-4096}" --windows 4 --out "$OUT/layer_plan.json"
  BEST=${LSA_BEST:-plan=lsa:layer_plan=$OUT/layer_plan.json}
  if [ -z "${LSA_BEST:-}" ] && [ ! -f "$OUT/layer_plan.json" ]; then echo "no layer plan (calibrate failed): grid without it"; BEST=; fi
  POLICIES=${FID_POLICIES:-"full,lsa,${BEST:+$BEST,}streaming,snapkv,quest"}  # quest last: eager, the slowest per step
  COMMON=(--model "$M" --haystack "$H" --block-size 16 --prefill-chunk 8192 --batch 20 --quiet --ppl-tokens ${FID_PPL_TOKENS:-256}
          --max-tokens 24 --depths 0.1,0.3,0.5,0.7,0.9 --min-resident-tokens 0 --keep-going ${FID_EXTRA:-})
  TAIL=3 step fid_grid "${FID_GRID_S:-225}" python3 -m cli eval "${COMMON[@]}" \
    --tasks niah,multikey,session,ppl,agreement --texts essays,pydoc --contexts "${FID_CONTEXTS:-8192,4096}" \
    --agreement-tokens 64 --budgets 0.1 --limit "${FID_LIMIT:-niah=4,multikey=4,session=4,ppl=20,agreement=20}" \
    --policies "$POLICIES" --out "$OUT/grid"
  [ "${FID_SWEEP_S:-120}" -gt 0 ] && TAIL=3 step fid_sweep "${FID_SWEEP_S:-120}" python3 -m cli eval "${COMMON[@]}" \
    --tasks ppl,niah --texts essays,pydoc --contexts "${FID_SWEEP_CONTEXT:-8192}" --budgets 0.05,0.1,0.2,0.3,0.5 \
    --limit "${FID_SWEEP_LIMIT:-niah=4,ppl=20}" --policies "$POLICIES" --out "$OUT/sweep"
  for f in "$OUT"/grid/results.md "$OUT"/sweep/results.md; do [ -f "$f" ] && head -c 6000 "$f"; done
  return 0
}

phase_floor() {
  # JSON: profile_step, bench_decode_b1, bench_decode_max (and floor.log, floor_tests.log)
  t0=$SECONDS
  # FLOOR_REHEARSE=1: the same commands at tiny shapes on the CPU (a rehearsal off the device; tests
  # collected only, time limits x5 for a CPU shared with other work)
  shapes="" ctx="131072 524288" ctx_max=131072 win1="--rounds 2 --steps 64" win2="--rounds 2 --steps 32" cap="" collect="" slow=1 psteps=32
  [ -n "${FLOOR_REHEARSE:-}" ] && shapes="--config tiny --layers 2 --device cpu" ctx="8192 16384" ctx_max=8192 \
    win1="--rounds 1 --steps 12 --cycle 8" win2="--rounds 1 --steps 8 --cycle 8" cap="--max-batch 3" collect="--collect-only" psteps=4 \
    slow=5
  # 1. the CUDA side of what changed: load_blocks (bf16 / fp16 on the GPU), the int4 mirror in the engine,
  #    fused projections vs transformers, CUDA graphs, budget 1.0 = full attention
  #    (every test that takes the CUDA path where there is one: the kernels' and the engine's)
  timeout $((150 * slow)) python3 -m pytest -q -p no:warnings $collect tests/test_kernels_*.py tests/test_dispatch.py \
    tests/test_int4_mirror.py tests/test_host_mirror.py tests/test_fp8_mirror.py tests/test_model_parity.py \
    tests/test_graphs.py tests/test_warm_up.py tests/test_layerwise_prefill.py \
    "tests/test_policies.py::test_lsa_with_full_budget_equals_full_attention" > "$OUT/floor_tests.log" 2>&1
  echo "tests rc=$? ($((SECONDS - t0)) s):"; grep -E "^E |FAILED|passed|failed" "$OUT/floor_tests.log" | head -12
  # 2. where the step's time goes now (random KV, as the 2026-12-01 profile), against its floor
  [ "${FLOOR_PROFILE:-1}" = 1 ] && timeout $((100 * slow)) python3 -m benchmarks.profile_step --contexts $ctx --steps $psteps $shapes \
    --out "$OUT/profile_step.json" 2>&1 | grep -v Warning
  echo "profile done ($((SECONDS - t0)) s)"
  # 3. batch 1, full vs lsa 0.10 alive together, plans churning like real text (a third of the set per cycle)
  timeout $((110 * slow)) python3 -m cli bench decode --contexts $ctx --batch 1 --rhos 0.1 --churn 0.33 $shapes $win1 \
    --out "$OUT/bench_decode_b1.json" 2>&1 | grep -v built | tail -6
  echo "batch 1 done ($((SECONDS - t0)) s)"
  # 4. 128K at each policy's largest batch: full (GPU memory), lsa over the fp8 and the int4 mirror (host RAM);
  #    ~150 s per mirror: with the steps above it passes a call's 10 minutes, so FLOOR_MAX=1 or the floor-max phase
  [ "${FLOOR_MAX:-0}" = 1 ] || { echo "floor phase done in $((SECONDS - t0)) s (batch max: the floor-max phase)"; return 0; }
  phase_floor_max
}

phase_boundary_max() {
  # issue 13's 7x at 128K x 24 over int4: where a boundary step's extra time goes at batch 24 (the step's
  # kernels over 64 steps with boundaries, against the same profile's median), then the batch-max row itself
  t0=$SECONDS
  timeout 240 python3 -m benchmarks.profile_step --contexts 131072 --batch ${BMAX_BATCH:-24} --host-dtype int4 --churn 0.33 \
    --steps 64 --out "$OUT/profile_max.json" 2>&1 | grep -v -E "Warning|warn|USDT"
  echo "profile done ($((SECONDS - t0)) s)"
  timeout 280 python3 -m cli bench decode --contexts 131072 --batch max --rhos 0.1 --churn 0.33 --host-dtype int4 \
    --rounds 2 --steps 32 --out "$OUT/bench_decode_max.json" 2>&1 | grep -v built | tail -8
  echo "boundary-max done in $((SECONDS - t0)) s"
}

phase_floor_max() {
  t0=$SECONDS shapes=${shapes-} ctx_max=${ctx_max:-131072} win2=${win2:-"--rounds 2 --steps 32"} cap=${cap-} slow=${slow:-1}
  [ -n "${FLOOR_REHEARSE:-}" ] && shapes="--config tiny --layers 2 --device cpu" ctx_max=8192 \
    win2="--rounds 1 --steps 8 --cycle 8" cap="--max-batch 3" slow=5
  timeout $((280 * slow)) python3 -m cli bench decode --contexts $ctx_max --batch max --rhos 0.1 --churn 0.33 $shapes \
    --host-dtype fp8 int4 $win2 $cap --out "$OUT/bench_decode_max.json" 2>&1 | grep -v built | tail -6
  echo "floor phase done in $((SECONDS - t0)) s"
}

phase_fused_ab() {
  # The fused decode path (kernels.decode_linear, LSA_FUSED_DECODE=1) against the separate kernels (~3 min):
  # bench decode at batch 1 (full and lsa alive together) with each, then the fused step's profile at 128K.
  # JSON: bench_fused{1,0}.json, profile_fused.json, decode_linear.json. FLOOR_REHEARSE=1: tiny shapes on the CPU.
  local t0=$SECONDS shapes="" ctx="131072 524288" win="--rounds 2 --steps 64" slow=1 pctx=131072 psteps=32 collect=""
  [ -n "${FLOOR_REHEARSE:-}" ] && shapes="--config tiny --layers 2 --device cpu" ctx="8192" \
    win="--rounds 1 --steps 12 --cycle 8" slow=5 pctx=8192 psteps=4 collect="--collect-only"
  # its CUDA tests first: the kernel in bf16 / fp16, the fused model against transformers and the unfused
  # path, CUDA graphs and budget 1.0 = full attention with it on
  LSA_FUSED_DECODE=1 timeout $((120 * slow)) python3 -m pytest -q -p no:warnings $collect tests/test_kernels_decode_linear.py \
    tests/test_model_parity.py tests/test_graphs.py "tests/test_policies.py::test_lsa_with_full_budget_equals_full_attention" \
    > "$OUT/fused_tests.log" 2>&1
  echo "tests rc=$? ($((SECONDS - t0)) s):"; grep -E "^E |FAILED|passed|failed|tests collected" "$OUT/fused_tests.log" | head -8
  for f in 1 0; do
    echo "== LSA_FUSED_DECODE=$f"
    LSA_FUSED_DECODE=$f timeout $((110 * slow)) python3 -m cli bench decode --contexts $ctx --batch 1 --rhos 0.1 \
      --churn 0.33 $shapes $win --out "$OUT/bench_fused$f.json" 2>&1 | grep -v built | tail -6
  done
  LSA_FUSED_DECODE=1 timeout $((100 * slow)) python3 -m benchmarks.profile_step --contexts $pctx --steps $psteps $shapes \
    --out "$OUT/profile_fused.json" 2>&1 | grep -v Warning | head -14
  # a layer's projections with and without the fusion, in isolation, and the GEMV's tile sweep (CUDA only)
  [ -z "${FLOOR_REHEARSE:-}" ] && timeout 150 python3 -m benchmarks.decode_linear --out "$OUT/decode_linear.json" 2>&1 | tail -4
  echo "fused-ab done in $((SECONDS - t0)) s"
}

phase_overlap() {
  # issue 13's batch-1 targets: overlapped decode (engine/llm.py: a step launched before the step before's
  # tokens are read) against the same engines without it, in alternation (~7 min). JSON: bench_overlap_b1.json,
  # bench_overlap_max.json; log overlap.log. FLOOR_REHEARSE=1: tiny shapes on the CPU.
  local t0=$SECONDS shapes="" ctx="131072 524288" win="--rounds 2 --steps 64" win2="--rounds 2 --steps 32" slow=1 \
    collect="" max="--host-fraction 0.87 --max-batch 24"
  [ -n "${FLOOR_REHEARSE:-}" ] && shapes="--config tiny --layers 2 --device cpu" ctx="8192" \
    win="--rounds 1 --steps 12 --cycle 8" win2="--rounds 1 --steps 8 --cycle 8" slow=5 collect="--collect-only" \
    max="--max-batch 3"
  # its CUDA tests: overlap on and off give the same answers through captured graphs; the graphs' and the
  # full-budget tests with it on (the default on CUDA)
  if [ "${OVERLAP_TESTS:-1}" = 1 ]; then  # OVERLAP_TESTS=0: the benches alone (-1 min)
    timeout $((120 * slow)) python3 -m pytest -q -p no:warnings $collect tests/test_overlap_decode.py tests/test_graphs.py \
      "tests/test_policies.py::test_lsa_with_full_budget_equals_full_attention" \
      "tests/test_staging.py::test_overlapped_decode_steps_never_wait_for_the_stream" \
      "tests/test_staging.py::test_level1_launch_after_a_boundary_does_not_wait_for_the_step" > "$OUT/overlap_tests.log" 2>&1
    echo "tests rc=$? ($((SECONDS - t0)) s):"; grep -E "^E |FAILED|passed|failed|tests collected" "$OUT/overlap_tests.log" | head -8
  fi
  timeout $((200 * slow)) python3 -m cli bench decode --contexts $ctx --batch 1 --rhos 0.1 --churn 0.33 --overlap both \
    $shapes $win --out "$OUT/bench_overlap_b1.json" 2>&1 | grep -v built | tail -10
  echo "batch 1 done ($((SECONDS - t0)) s)"
  [ "${OVERLAP_MAX:-1}" = 1 ] && timeout $((260 * slow)) python3 -m cli bench decode --contexts ${ctx%% *} --batch max \
    --rhos 0.1 --churn 0.33 --host-dtype int4 --overlap both $max $shapes $win2 --out "$OUT/bench_overlap_max.json" \
    2>&1 | grep -v built | tail -8
  echo "overlap done in $((SECONDS - t0)) s"
}

phase_gemv_ab() {
  # issue 13's batch-1 medians: the plain Triton GEMV for o, gate|up, down and the LM head (LSA_DECODE_GEMV=1,
  # kernels.decode_gemv) against cuBLAS, bench decode b1 (128K, 512K; overlap on, full and lsa alive together)
  # alternated over GEMV_ROUNDS rounds (~4.5 min at 2), then the step's profile at 128K with it. JSON:
  # bench_gemv{1,0}_r{N}.json, profile_gemv.json; log gemv_ab.log. FLOOR_REHEARSE=1: tiny shapes on the CPU.
  local t0=$SECONDS shapes="" ctx="131072 524288" win="--rounds 2 --steps 64" slow=1 pctx=131072 psteps=32 collect=""
  [ -n "${FLOOR_REHEARSE:-}" ] && shapes="--config tiny --layers 2 --device cpu" ctx="8192" \
    win="--rounds 1 --steps 12 --cycle 8" slow=5 pctx=8192 psteps=4 collect="--collect-only"
  # its CUDA tests: the GEMV in bf16 / fp16 against float64, the model with it against cuBLAS, CUDA graphs,
  # overlapped decode and budget 1.0 = full attention with it on
  LSA_DECODE_GEMV=1 timeout $((150 * slow)) python3 -m pytest -q -p no:warnings $collect tests/test_kernels_decode_linear.py \
    tests/test_model_parity.py tests/test_graphs.py tests/test_overlap_decode.py tests/test_env.py \
    "tests/test_policies.py::test_lsa_with_full_budget_equals_full_attention" > "$OUT/gemv_tests.log" 2>&1
  echo "tests rc=$? ($((SECONDS - t0)) s):"; grep -E "^E |FAILED|passed|failed|tests collected" "$OUT/gemv_tests.log" | head -10
  for r in $(seq 1 "${GEMV_ROUNDS:-2}"); do
    for g in 1 0; do
      echo "== round $r LSA_DECODE_GEMV=$g ($((SECONDS - t0)) s)"
      LSA_DECODE_GEMV=$g timeout $((110 * slow)) python3 -m cli bench decode --contexts $ctx --batch 1 --rhos 0.1 \
        --churn 0.33 --overlap on $shapes $win --out "$OUT/bench_gemv${g}_r$r.json" 2>&1 | grep -v built | grep -E "^ +[0-9]" | head -4
    done
  done
  LSA_DECODE_GEMV=1 timeout $((100 * slow)) python3 -m benchmarks.profile_step --contexts $pctx --steps $psteps $shapes \
    --out "$OUT/profile_gemv.json" 2>&1 | grep -v Warning | head -14
  echo "gemv-ab done in $((SECONDS - t0)) s"
}

phase_step_ab() {
  # issue 13's batch-1 medians, the step as it is ("base") against variants with a choice set otherwise
  # (benchmarks/variant.py; STEP_VARIANTS, ";" between variants, default "eleventh": the step before
  # the twelfth session), bench decode b1 (128K, 512K; overlap on, full and lsa alive together) alternated over
  # STEP_ROUNDS (2) rounds (~2 min a variant a round), after the step's CUDA tests; then its profile at 128K.
  # JSON: bench_step{0,1,...}_r{N}.json (0 = base), profile_step.json; log step_ab.log. FLOOR_REHEARSE=1: tiny, CPU.
  local t0=$SECONDS shapes="" ctx="131072 524288" win="--rounds 2 --steps 64" slow=1 pctx=131072 psteps=32 collect=""
  [ -n "${FLOOR_REHEARSE:-}" ] && shapes="--config tiny --layers 2 --device cpu" ctx="8192" \
    win="--rounds 1 --steps 12 --cycle 8" slow=5 pctx=8192 psteps=4 collect="--collect-only"
  if [ "${STEP_TESTS:-1}" != 0 ]; then  # STEP_TESTS=0: in a call of their own (~4 min on the H200)
    timeout $((250 * slow)) python3 -m pytest -q -p no:warnings $collect tests/test_kernels_decode_linear.py \
      tests/test_kernels_attention.py tests/test_model_parity.py tests/test_graphs.py tests/test_overlap_decode.py \
      "tests/test_policies.py::test_lsa_with_full_budget_equals_full_attention" > "$OUT/step_tests.log" 2>&1
    echo "tests rc=$? ($((SECONDS - t0)) s):"; grep -E "^E |FAILED|passed|failed|tests collected" "$OUT/step_tests.log" | head -10
  fi
  local variants="base;${STEP_VARIANTS:-eleventh}"
  for r in $(seq 1 "${STEP_ROUNDS:-2}"); do
    local i=0
    while IFS= read -r v; do
      echo "== round $r variant $i: $v ($((SECONDS - t0)) s)"
      # shellcheck disable=SC2086
      timeout $((110 * slow)) python3 -m benchmarks.variant $v -- bench decode --contexts $ctx --batch 1 --rhos 0.1 \
        --churn 0.33 --overlap on $shapes $win --out "$OUT/bench_step${i}_r$r.json" 2>&1 | grep -v built | grep -E "^ +[0-9]" | head -4
      i=$((i + 1))
    done < <(tr ';' '\n' <<< "$variants")
  done
  timeout $((100 * slow)) python3 -m benchmarks.profile_step --contexts $pctx --steps $psteps $shapes \
    --out "$OUT/profile_step.json" 2>&1 | grep -v Warning | head -14
  echo "step-ab done in $((SECONDS - t0)) s"
}

phase_index_score() {
  # Issue 10: the attention score reads the index layers' keys of the whole context from the host mirror at each
  # boundary (no device index keys); the mean-key score reads the device summaries. Both churn a third of the set.
  # JSON: bench_decode_score_b1.json, bench_decode_score_max.json.
  t0=$SECONDS shapes="" ctx="131072 524288" ctx_max=131072 win1="--rounds 2 --steps 64" win2="--rounds 2 --steps 32" cap="" slow=1
  [ -n "${FLOOR_REHEARSE:-}" ] && shapes="--config tiny --layers 2 --device cpu" ctx=8192 ctx_max=8192 \
    win1="--rounds 1 --steps 8 --cycle 8" win2="--rounds 1 --steps 8 --cycle 8" cap="--max-batch 3" slow=5
  # one boundary's scoring by piece, host and device ms (128K; bf16 and int4 mirrors)
  probe="--context 131072"; [ -n "${FLOOR_REHEARSE:-}" ] && probe="--config tiny --layers 2 --device cpu --context 8192 --repeats 2"
  timeout $((120 * slow)) python3 -m benchmarks.level1_probe $probe --host-dtype model int4 \
    --out "$OUT/level1_probe.json" 2>&1 | grep -v -E "USDT|Warning" | tail -5
  timeout $((230 * slow)) python3 -m cli bench decode --contexts $ctx --batch 1 --rhos 0.1 --churn 0.33 \
    --index-score mean attention $shapes $win1 --out "$OUT/bench_decode_score_b1.json" 2>&1 | grep -v built | tail -14
  echo "batch 1 done ($((SECONDS - t0)) s)"
  timeout $((320 * slow)) python3 -m cli bench decode --contexts $ctx_max --batch max --rhos 0.1 --churn 0.33 \
    --host-dtype int4 --index-score mean attention $shapes $win2 $cap --out "$OUT/bench_decode_score_max.json" 2>&1 \
    | grep -v built | tail -10
  echo "index-score done in $((SECONDS - t0)) s"
}

phase_floor_eval() {
  # Issue 13, the int4 mirror's accuracy cost against the bf16 and FP8 mirrors (~2 min): SmolLM2, LSA 0.10,
  # cycle 16 (so that blocks come back from the mirror every 16 tokens), ppl / NIAH / agreement at 4K. The three
  # runs share the GPU at once (a 135M model; accuracy, not speed, is measured here).
  # JSON: eval_{model,fp8,int4}.json (results.json of each run) and floor_eval.log.
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
}

for phase in "$@"; do
  case $phase in
  served1) phase_prefill; phase_serve ;;
  served2) phase_checks; phase_pooled ;;
  prefill | serve | checks | pooled | early | fidelity) phase_$phase ;;
  floor) phase_floor 2>&1 | tee -a "$OUT/floor.log" ;;
  floor-max) phase_floor_max 2>&1 | tee -a "$OUT/floor.log" ;;
  boundary-max) phase_boundary_max 2>&1 | tee -a "$OUT/boundary_max.log" ;;
  floor-eval) phase_floor_eval 2>&1 | tee -a "$OUT/floor_eval.log" ;;
  fused-ab) phase_fused_ab 2>&1 | tee -a "$OUT/fused_ab.log" ;;
  overlap) phase_overlap 2>&1 | tee -a "$OUT/overlap.log" ;;
  gemv-ab) phase_gemv_ab 2>&1 | tee -a "$OUT/gemv_ab.log" ;;
  step-ab) phase_step_ab 2>&1 | tee -a "$OUT/step_ab.log" ;;
  served-gemv) phase_served_gemv 2>&1 | tee -a "$OUT/served_gemv.log" ;;
  index-score) phase_index_score 2>&1 | tee -a "$OUT/index_score.log" ;;
  *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
ls /dev/shm 2>/dev/null | grep -c lsa-kv | sed 's/^/arena files left in \/dev\/shm: /'
[ -f "$OUT/steps.txt" ] && cat "$OUT/steps.txt"
exit 0
