#!/usr/bin/env bash
# The quantization grid of issue 5 on a lent CUDA machine: `bench/quantize/quantize.py --device cuda` quantizes
# SmolLM2 at each grid point there and measures the protocol perplexity there (calibration and evaluation as on the
# CPU).
#
# SmolLM2's GGUF (98 MB) is larger than what one call may carry (64 MiB), so it travels in parts over consecutive
# calls on the same warm machine: each call copies the parts it carries into $KEEP, and the call that has them all
# joins them and checks the sha256. Prepare here (git-ignored):
#   split -b 50M <gguf> .device-data/smollm2.gguf.part-; sha256sum <gguf> | cut -d' ' -f1 > .device-data/smollm2.gguf.sha256
#   cp -r ../shared/data/wikitext-2 ../shared/data/wikitext-2-raw .device-data/data/
#   pip download --no-deps gguf accelerate -d .whl/py        (installed there if the machine lacks them)
# Then: call 1 `bash bench/device/gpu_grid.sh stash` carrying part-aa; call 2
# `bash bench/device/gpu_grid.sh 'NAME=field=value,...' ...` carrying the other parts, .device-data/data and .whl/py.
# Results: $OUT/grid.jsonl.
# SCRIPT=bench/quantize/exl2_allocation.py bash bench/device/gpu_grid.sh --measurement M --bpw 4 ...: that script
# instead.
set -uo pipefail
OUT_DEFAULT=/tmp/qtool_grid_out source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
KEEP="${KEEP:-/tmp/qtool_keep}"
mkdir -p "$KEEP"
cp --update=none .device-data/smollm2.gguf.part-* .device-data/smollm2.gguf.sha256 "$KEEP"/ 2>/dev/null
[[ -d .device-data/data ]] && cp -r --update=none .device-data/data "$KEEP"/
if [[ "${1:-}" == "stash" ]]; then ls -la "$KEEP"; exit 0; fi
GGUF="$KEEP/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$KEEP"/smollm2.gguf.part-* > "$GGUF"
[[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" == "$(cat "$KEEP/smollm2.gguf.sha256")" ]] || { echo "GGUF parts missing or corrupt:"; ls -la "$KEEP"; exit 3; }
python3 -c 'import gguf, accelerate' 2>/dev/null || python3 -m pip install -q --no-index --no-deps .whl/py/*.whl
export QTOOL_CACHE_DIR="$KEEP/cache"
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'
if [[ -n "${SCRIPT:-}" ]]; then  # another bench script taking --model/--data/--device/--jsonl, e.g. bench/quantize/exl2_allocation.py
    timeout "${GRID_TIMEOUT:-540}" python3 "$SCRIPT" --model "$GGUF" --data "$KEEP/data" --device cuda --jsonl "$OUT/grid.jsonl" "$@" 2>&1 | grep -v "it/s\]" | tail -40
    exit 0
fi
# BENCH_ARGS: more bench/quantize/quantize.py arguments, e.g. "--exl2-curve 2.5,3,4 --measurement .device-data/m.json"
timeout "${GRID_TIMEOUT:-540}" python3 bench/quantize/quantize.py --model "$GGUF" --data "$KEEP/data" --device cuda --windows 40 \
    --out-dir /tmp/qtool_grid --jsonl "$OUT/grid.jsonl" ${DEFAULTS:+--defaults} ${BENCH_ARGS:-} --grid "$@" 2>&1 | grep -v "it/s\]" | tail -40
