#!/usr/bin/env bash
# Issue 26's real-size quantization benchmarks (bench/quantize/big_model.py) on the lent GPU machine, one plan per
# device call (each within one 600 s command):
#   bash bench/device/big_quantize.sh prepare         here (the developers' machine, PyPI reachable): fills the
#                                                     git-ignored .device-data/big (SmolLM2's tokenizer, WikiText-2
#                                                     validation) and .whl/big (GPTQModel 7.7.0 + what the machine's
#                                                     image lacks; ExLlamaV2 0.3.2), and prints the carry size
#   bash bench/device/big_quantize.sh gptq            there: the 7B shape's first 4 layers, qtool under a 24 GiB cap
#                                                     then GPTQModel (the same-job ratio), then the whole 7B through
#                                                     qtool (the goal: <= 3 min, <= 12 GB)
#   bash bench/device/big_quantize.sh gptq-7b         there: the whole 7B through qtool alone (the goal's row, with
#                                                     the call's whole time)
#   bash bench/device/big_quantize.sh exl2-70b        there: the 70B shape's first 2 layers under an 80 GiB cap, then
#                                                     EXL2 4.0 bpw, qtool vs ExLlamaV2's converter, on the 7B's first
#                                                     layer (the extension builds in the background from the start)
#   bash bench/device/big_quantize.sh exl2            there: the EXL2 pair alone, with more time (if exl2-70b cut it)
#   bash bench/device/big_quantize.sh gptq-7b-batch   there: the whole 7B through qtool at the default calibration
#                                                     batch, then at batch_tokens=16384 (which default suits the GPU)
#   bash bench/device/big_quantize.sh gptq-pair       there: the whole 7B through qtool under the goal's 12 GB
#                                                     budget, then GPTQModel on the same job (the goal's ratio)
#   bash bench/device/big_quantize.sh memory          there: the quantization's GPU tests, one layer's per-group
#                                                     GPU peaks (profile_layer.py, uncapped and under 10.5 GiB),
#                                                     then gptq-7b with what is left of DEADLINE_S
#   bash bench/device/big_quantize.sh profile         there: where a layer's time goes (profile_layer.py under torch's
#                                                     profiler, 2 layers under 10.5 GiB, the plan's --qtool-set
#                                                     pairs; SWEEP_BATCH_TOKENS: then unprofiled at each of
#                                                     those batch sizes), then gptq-7b (or AFTER_PROFILE's plan)
#   bash bench/device/big_quantize.sh gptqmodel-7b    there: GPTQModel on the whole 7B (optional)
#   bash bench/device/big_quantize.sh weigh-70b       there: EXL2's weighing pass alone on the 70B shape's first 2
#                                                     layers: as planned (80 GiB cap), its inputs forced to disk, and
#                                                     under a 10 GiB cap (--weigh-cap-gib) the ladder must take
#                                                     (no wheels needed); the first two rows' sensitivity digests
#                                                     must be equal, the capped row's values close (its batches differ)
# Carry for the GPU plans: .device-data/big .whl/big. More big_model.py plan arguments after the plan's name
# (e.g. --peer-layers 8, --deadline-s 500). Results: $OUT/big_<plan>.jsonl, $OUT/big_<plan>.log, $OUT/stages.log.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # bench/device/ -> the repo root
DATA=.device-data/big
WHEELS=.whl/big
PLAN="${1:-gptq}"
[[ $# -gt 0 ]] && shift
cd "$REPO"

if [[ $PLAN == prepare ]]; then
    set -e
    PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
    [[ -x $PYTHON ]] || PYTHON=/work/main/.venv/bin/python
    mkdir -p "$DATA" "$WHEELS/gptqmodel" "$WHEELS/exllamav2"
    cp "${SHARED:-$REPO/../shared/data}/wikitext-2/wiki.valid.tokens" "$DATA/"
    # SmolLM2's tokenizer as qtool reads it from the GGUF (the GGUF itself is too large to carry)
    PYTHONPATH="$REPO" "$PYTHON" -c 'from qtool.checkpoints.sources import load_model
load_model("smollm2-135m", device="cpu", dtype="float32").tokenizer.save_pretrained("'"$DATA/tokenizer"'")'
    pip_get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any "$@"; }
    # GPTQModel and five of its needs ship as sdists only: built here into wheels (PyPcre's C extension for the
    # machine's cp312, without -march=native, linked to the system's libpcre2-8.so.0: a copy travels in lib/)
    sdists=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary gptqmodel,pypcre,device-smi,logbar,tokenicer,defuser -d "$sdists" \
        gptqmodel==7.7.0 pypcre==0.6.4 device-smi==0.5.7 logbar==0.4.15 tokenicer==0.0.14 defuser==0.0.28
    # a Python 3.12 (the machine's) to build PyPcre's extension with; pyenv's shim may stand for none
    PY312="${PY312:-}"
    for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
        [[ -z $PY312 ]] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && PY312=$candidate
    done
    [[ -n $PY312 ]] || { echo "no Python 3.12 here to build PyPcre for the machine's cp312 (set PY312)" >&2; exit 1; }
    PYPCRE_DISABLE_NATIVE_FLAGS=1 "$PY312" -m pip wheel -q --no-deps -w "$WHEELS/gptqmodel" "$sdists"/*.tar.gz
    # in the image: torch, transformers, accelerate, numpy, safetensors, pillow, protobuf, pandas, pyarrow, ...;
    # not there: datasets and its dill and multiprocess, torchao
    pip_get -d "$WHEELS/gptqmodel" torchao==0.18.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    mkdir -p "$WHEELS/gptqmodel/lib" && cp -L /lib/x86_64-linux-gnu/libpcre2-8.so.0 "$WHEELS/gptqmodel/lib/"
    # ExLlamaV2's converter reads its calibration parquet with fastparquet (and cramjam)
    pip_get -d "$WHEELS/exllamav2" exllamav2==0.3.2 fastparquet==2026.9.0 cramjam==2.14.0
    rm -rf "$sdists"
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
    carried=$(du -sb "$DATA" "$WHEELS" | awk '{s += $1} END {print s}')
    du -sh "$DATA" "$WHEELS"/*
    printf 'working tree %d + carried %d = %d bytes of %d\n' "$tree" "$carried" $((tree + carried)) $((64 << 20))
    (( tree + carried < 64 << 20 )) || { echo "over the 64 MiB a call may send" >&2; exit 1; }
    exit 0
fi

OUT_DEFAULT=/tmp/big_quantize_out LOG_NAME="big_$PLAN.log" source "$REPO/bench/device/common.sh"  # after cd: by REPO
WORK="${WORK:-/tmp/big_work}"
mkdir -p "$WORK"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

# each peer in a folder of its own, on PYTHONPATH only for its own stage (so not common.sh's install_wheels)
sites=()
if compgen -G "$WHEELS/gptqmodel/*.whl" >/dev/null; then
    install_peer /tmp/site_gptqmodel "$WHEELS"/gptqmodel/*.whl && sites+=(--gptqmodel-site /tmp/site_gptqmodel) \
        || log "GPTQModel wheels did not install"
    use_carried_pcre "$REPO/$WHEELS/gptqmodel/lib"
fi
if compgen -G "$WHEELS/exllamav2/*.whl" >/dev/null; then
    install_peer /tmp/site_exllamav2 "$WHEELS"/exllamav2/*.whl && sites+=(--exllamav2-site /tmp/site_exllamav2) \
        || log "ExLlamaV2 wheel did not install"
fi
python3 -c 'import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "transformers",
      transformers.__version__, "device", torch.cuda.get_device_name(0))' 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
free -g | head -2 | tee -a "$LOG"; df -h /tmp | tail -1 | tee -a "$LOG"

build=""
if [[ $PLAN == exl2* && -d /tmp/site_exllamav2 ]]; then
    # ExLlamaV2's extension compiles on first import (minutes, on the CPU cores): started now, its stage waits for
    # it (torch's build lock) and times only the converter
    log "building ExLlamaV2's extension in the background"
    export BIG_BENCH_NOTE="ExLlamaV2's extension compiled in the background (MAX_JOBS=${MAX_JOBS:-12}) while this call's first stages ran"
    ( began=$SECONDS; MAX_JOBS="${MAX_JOBS:-12}" PYTHONPATH="/tmp/site_exllamav2" python3 -c 'import exllamav2.ext' >"$OUT/exl2_build.log" 2>&1
      echo "build exit $? after $((SECONDS - began)) s" >>"$OUT/exl2_build.log" ) &
    build=$!
fi

if [[ $PLAN == memory ]]; then
    # where the 7B's GPU memory goes: the quantization's GPU tests (the solve's and the Hessian read's own peaks
    # among them), one layer's per-group torch peaks without a cap and under the goal's budget (profile_layer.py,
    # 2 layers: the second shows what the first leaves behind), then the whole 7B under the budget with what is left
    log "GPU tests"
    { timeout "$(limit 100)" python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/quant
      timeout "$(limit 100)" python3 -m pytest -q -p no:cacheprovider -rfE tests/quant/test_gpu_budget.py \
          tests/kernels/test_gptq_block.py; } 2>&1 | tail -20 | tee -a "$LOG"
    for cap in none 10.5; do
        capped=(); [[ $cap != none ]] && capped=(--gpu-memory-gib "$cap")
        log "one layer's peaks, cap $cap"
        timeout "$(limit 110)" python3 bench/quantize/profile_layer.py --data "$DATA" --work "$WORK/profile" --layers 2 \
            --dtypes bfloat16 --no-profiler --out "$OUT/profile_layer.jsonl" "${capped[@]}" >"$OUT/profile_$cap.log" 2>&1
        log "profile (cap $cap): exit $?"
        grep -v '^{' "$OUT/profile_$cap.log" | grep -v "top \|^    " | tail -20 | tee -a "$LOG"
    done
    PLAN=gptq-7b
fi

if [[ $PLAN == profile ]]; then
    sets=(); previous=""
    for arg in "$@"; do [[ $previous == --qtool-set ]] && sets+=(--set "$arg"); previous=$arg; done
    log "one layer's time under the profiler (${sets[*]})"
    timeout "$(limit 150)" python3 bench/quantize/profile_layer.py --data "$DATA" --work "$WORK/profile" --layers 2 \
        --dtypes bfloat16 --gpu-memory-gib 10.5 --out "$OUT/profile_layer.jsonl" "${sets[@]}" >"$OUT/profile.log" 2>&1
    log "profile: exit $?"
    grep -v '^{' "$OUT/profile.log" | tail -90 | tee -a "$LOG"
    # then, without the profiler, each calibration batch size of SWEEP_BATCH_TOKENS (e.g. "4096 16384"), under
    # SWEEP_CAP_GIB (14: the estimate plans the lean replay for each, whose larger batches it counts more scratch for)
    for tokens in ${SWEEP_BATCH_TOKENS:-}; do
        log "2 layers at batch_tokens=$tokens"
        timeout "$(limit 60)" python3 bench/quantize/profile_layer.py --data "$DATA" --work "$WORK/profile" --layers 2 \
            --dtypes bfloat16 --gpu-memory-gib "${SWEEP_CAP_GIB:-14}" --no-profiler --out "$OUT/profile_batch_tokens.jsonl" "${sets[@]}" \
            --set "batch_tokens=$tokens" >"$OUT/profile_bt$tokens.log" 2>&1
        log "batch_tokens=$tokens: exit $?"
        grep -v '^{' "$OUT/profile_bt$tokens.log" | grep "^##\|layer 2/2\|writing" | tee -a "$LOG"
    done
    PLAN="${AFTER_PROFILE:-gptq-7b}"  # e.g. gptq-pair
fi

# the plan keeps to what is left of DEADLINE_S (seconds from this script's start; unset: PLAN_DEADLINE_S, 510), each
# stage getting what is left up to its own limit: with the installs before it and the table after it, inside one
# 600 s command
PYTHONPATH="$REPO" timeout "$(limit "${PLAN_TIMEOUT_S:-550}")" python3 bench/quantize/big_model.py plan "$PLAN" --work "$WORK" \
    --data "$DATA" --out "$OUT/big_$PLAN.jsonl" --deadline-s "$(limit "${PLAN_DEADLINE_S:-510}")" "${sites[@]}" "$@" 2>&1 | tee -a "$LOG" \
    | grep -v '^{"progress"'
log "plan $PLAN: exit ${PIPESTATUS[0]}"
[[ -n $build ]] && { kill "$build" 2>/dev/null; tail -2 "$OUT/exl2_build.log"; }
tail -c 8000000 "$WORK/stages.log" >"$OUT/stages.log" 2>/dev/null  # the stages' own output (GPTQModel's is long)
ls -la "$WORK" | head -20
exit 0
