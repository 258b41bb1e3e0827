#!/usr/bin/env bash
# Rehearse the device calls HERE, no GPU (after prepare.sh): each call gets a fresh fake repo root
# holding only its part folder; LSA_DEV_ROOT=/tmp/lsa-rehearse stands for /tmp there; python3 is a
# Python 3.12 venv standing in for the image (the closure's wheels that prepare.sh counts as the
# image's, with an older typing_extensions). Then the Serve smoke test and a default ray.init.
# Needs python3.12 (PY312=path; e.g. pyenv's). Uses ports 8123 and Ray's defaults.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN=$(dirname "$(git -C "$HERE" rev-parse --path-format=absolute --git-common-dir)")
DEV=${LSA_DEVICE_DIR:-$MAIN/.device}
for c in ${PY312:-} /root/.pyenv/versions/3.12*/bin/python3.12 python3.12; do "$c" -c '' 2>/dev/null && { PY312=$c; break; }; done
[ -n "${PY312:-}" ] || { echo "rehearse: no working python3.12; set PY312" >&2; exit 1; }
V=/tmp/lsa-rehearse-venv FAKE=/tmp/lsa-rehearse-repo
export LSA_DEV_ROOT=/tmp/lsa-rehearse
if [ ! -x $V/bin/python3 ]; then
  "$PY312" -m venv $V
  (cd "$DEV/cache" && $V/bin/python3 -m pip install -q --no-deps --no-index $(cat wheels/IMAGE.txt))
  $V/bin/python3 -m pip install -q --no-deps "typing_extensions==4.12.2"
fi
export PATH=$V/bin:$PATH
call() {  # call N: what one device call does
  rm -rf $FAKE; mkdir -p $FAKE/.device $FAKE/benchmarks/device
  cp -r "$DEV/part$1" $FAKE/.device/; cp "$HERE/smoke_serve.py" $FAKE/benchmarks/device/
  (cd $FAKE && bash .device/part$1/setup.sh receive "$1")
}
n=$(awk '$1=="parts" {print $3}' "$DEV/MANIFEST")
echo "### cold machine: the last part alone must fail"; rm -rf $LSA_DEV_ROOT
if call "$n"; then [ "$n" = 1 ] || { echo "rehearse: expected a failure"; exit 1; }; fi
[ "$n" = 1 ] || { echo "### ... and calling the earlier part(s) then completes it"; for p in $(seq 1 $((n - 1))); do call "$p"; done; }
echo "### in order, then once more (no-op)"; rm -rf $LSA_DEV_ROOT
for p in $(seq 1 "$n"); do call "$p"; done; call "$n"
cd $FAKE && source .device/part$n/env.sh
echo "### Serve smoke test"; timeout 300 python3 benchmarks/device/smoke_serve.py 2>&1 | grep -v "WARNING\|^\s*$" | tail -4
echo "### default ray.init (dashboard on)"; timeout 200 python3 -c "
import time, ray; t = time.time(); ctx = ray.init(num_cpus=2)
print(f'ray.init {time.time() - t:.1f}s, dashboard at {ctx.dashboard_url}'); assert ctx.dashboard_url; ray.shutdown()" 2>&1 | grep -v WARNING
echo "### gguf reads the model"; python3 -c "
import os, gguf; r = gguf.GGUFReader(os.environ['LSA_MODEL']); print(len(r.tensors), 'tensors: rehearsal OK')"
