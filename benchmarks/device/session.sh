#!/usr/bin/env bash
# The device calls of a session, by phase (run there, after setup.sh receive N and env.sh):
#   bash benchmarks/device/session.sh early    step profile (512K/128K), tiny-random served on CUDA, bench 128K
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
*)
  echo "unknown phase $phase"; exit 2 ;;
esac
