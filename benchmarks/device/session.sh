#!/usr/bin/env bash
# The device calls of a session, by phase (run there, after setup.sh receive N and env.sh):
#   bash benchmarks/device/session.sh early    step profile (512K/128K), tiny-random served on CUDA, bench 128K
#   bash benchmarks/device/session.sh fidelity issue 10's accuracy grids on SmolLM2 (~7 min; docs/accuracy.md):
#        layer plan by lsa calibrate, then every task at rho 0.10 (8K, 4K; essays and pydoc; n = 20 per cell),
#        then the budget sweep 0.05-0.5 (8K: ppl on both texts, NIAH); 8 files under $OUT
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
fidelity)
  # $LSA_MODEL: the SmolLM2 GGUF, $LSA_HAYSTACK: the essays (env.sh sets both). Files: gpu.txt, layer_plan.json,
  # grid/{results.json,results.md,accuracy.png}, sweep/ likewise; each eval rewrites its JSON and table after every run,
  # so a timeout leaves what was done. LSA_BEST (a policy spec) replaces the layer-plan variant; FID_* shrink the
  # grid for a rehearsal on a CPU (docs/accuracy.md: the rehearsal and the device-time estimate).
  M=${LSA_MODEL:?source env.sh first}; H=${LSA_HAYSTACK:?source env.sh first}
  timeout "${FID_CALIB_S:-75}" python3 -m cli calibrate --model "$M" --texts essays,pydoc --context "${FID_CALIB_CONTEXT:-4096}" \
    --windows 4 --out "$OUT/layer_plan.json" 2>&1 | grep -v Warning | tail -4
  BEST=${LSA_BEST:-plan=lsa:layer_plan=$OUT/layer_plan.json}
  if [ -z "${LSA_BEST:-}" ] && [ ! -f "$OUT/layer_plan.json" ]; then echo "no layer plan (calibrate failed): grid without it"; BEST=; fi
  POLICIES="full,lsa,${BEST:+$BEST,}streaming,snapkv,quest"  # quest last: eager, the slowest per step
  COMMON=(--model "$M" --haystack "$H" --block-size 16 --prefill-chunk 8192 --batch 20 --quiet --ppl-tokens 128
          --max-tokens 24 --depths 0.1,0.3,0.5,0.7,0.9 --min-resident-tokens 0 --keep-going ${FID_EXTRA:-})
  t0=$(date +%s)
  timeout "${FID_GRID_S:-225}" python3 -m cli eval "${COMMON[@]}" --tasks niah,multikey,session,ppl,agreement \
    --texts essays,pydoc --contexts "${FID_CONTEXTS:-8192,4096}" --agreement-tokens 64 --budgets 0.1 \
    --limit "${FID_LIMIT:-niah=4,multikey=4,session=4,ppl=20,agreement=20}" --policies "$POLICIES" \
    --out "$OUT/grid" 2>&1 | grep -v Warning | tail -3
  t1=$(date +%s); echo "grid: $((t1 - t0)) s"
  timeout "${FID_SWEEP_S:-120}" python3 -m cli eval "${COMMON[@]}" --tasks ppl,niah --texts essays,pydoc \
    --contexts "${FID_SWEEP_CONTEXT:-8192}" --budgets 0.05,0.1,0.2,0.3,0.5 --limit "${FID_SWEEP_LIMIT:-niah=4,ppl=20}" \
    --policies "$POLICIES" --out "$OUT/sweep" 2>&1 | grep -v Warning | tail -3
  echo "sweep: $(($(date +%s) - t1)) s"
  for f in "$OUT"/grid/results.md "$OUT"/sweep/results.md; do [ -f "$f" ] && head -c 6000 "$f"; done
  ;;
*)
  echo "unknown phase $phase"; exit 2 ;;
esac
