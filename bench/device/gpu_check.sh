#!/usr/bin/env bash
# On a CUDA machine, in stages (each under its own time limit, one stage failing does not stop the next):
#   tests   the kernel tests compiled (TRITON_INTERPRET unset)
#   decode  bench/runtime/decode.py: 32-layer 7B-shaped decode, 4-bit QuantLinear (triton) vs bf16, CUDA graphs
#   eval    `qtool eval` perplexity of a GPTQ checkpoint with --backend torch and --backend triton
#   floor   bench/kernels/read_floor.py: a read-only kernel over each layer's 4-bit bytes, bf16 and ours at M = 1 and 16
#   reduce  bench/kernels/split_k_reduction.py: the split-K reduction alone, each way of finishing a tile (~30 s)
#   profile Nsight Compute (ncu) on one launch of each bench/kernels/profile_kernels.py case (PROFILE_CASES narrows
#           them): counters, stall reasons per SASS instruction, exported as text
#   bench   bench/kernels/kernels.py (the issue's shape/M grid) with whatever time is left before DEADLINE_S
#   quick   tests + bench --quick
# Everything is written to $WORK (default /tmp/qtool_gpu) and packed into $OUT/results.tgz.
#
#   DEADLINE_S=560 bash bench/device/gpu_check.sh tests decode eval bench
#   BENCH_ARGS="--m 1,2,4,8" bash bench/device/gpu_check.sh bench
#
# eval reads the checkpoint from $CKPT (a directory), or assembles it from split parts: $CKPT_PARTS (files whose
# concatenation is model.safetensors, checked against model.sha256) plus the small files of $CKPT_SMALL.
# The repo need not be installed: it is pip-installed editable without dependencies, and if that fails the repo
# root goes on PYTHONPATH instead (the package is its qtool/ folder).
set -uo pipefail

OUT_DEFAULT=/tmp/qtool_gpu_out source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WORK="${WORK:-/tmp/qtool_gpu}"
PYTHON="${PYTHON:-python3}"
DEADLINE_S="${DEADLINE_S:-560}"
STAGES=("$@")
[[ ${#STAGES[@]} == 0 ]] && STAGES=(tests decode eval bench)
mkdir -p "$WORK"
left() { echo $((DEADLINE_S - (SECONDS - BEGAN))); }
has_stage() { local s; for s in "${STAGES[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }
pack() { tar czf "$OUT/results.tgz" --exclude="*.ncu-rep" -C "$WORK" . 2>/dev/null; }
trap pack EXIT

"$PYTHON" -c 'import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA",
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")' 2>&1 | tee "$WORK/versions.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv >>"$WORK/versions.txt" 2>&1

# asked from / so that the repo root (the cwd) does not make qtool importable here and nowhere else (subprocesses
# that tests start run scripts by path, without the cwd on sys.path)
if ! (cd / && "$PYTHON" -c 'import qtool.kernels.registry' 2>/dev/null); then
    if "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 \
        && (cd / && "$PYTHON" -c 'import qtool.kernels.registry') >>"$WORK/install.log" 2>&1; then
        echo "qtool: pip install -e . worked" | tee -a "$WORK/versions.txt"
    else
        # the package is the repo's qtool/ folder: the repo root on PYTHONPATH imports it as it stands
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        (cd / && "$PYTHON" -c 'import qtool.kernels.registry') || { echo "qtool cannot be imported" | tee -a "$WORK/versions.txt"; exit 1; }
        echo "qtool: via PYTHONPATH=$REPO (pip install failed, see install.log)" | tee -a "$WORK/versions.txt"
    fi
fi

status=0
stage_done() { echo "== $1: exit $2 at $((SECONDS - BEGAN)) s" | tee -a "$WORK/stages.txt"; [[ $2 != 0 ]] && status=$2; }

if has_stage tests || has_stage quick; then
    # every tuning candidate is compiled once for the bench's own case (4-bit g128 bf16); the other cases of that
    # test compile ~100 more kernels
    # KERNEL_TESTS narrows the run, e.g. KERNEL_TESTS=tests/kernels/test_gptq_gemm.py; TESTS_ARGS adds pytest
    # options (TESTS_ARGS="-n 4" compiles in 4 pytest-xdist workers where the image has xdist); TESTS_TIMEOUT_S caps it
    # shellcheck disable=SC2086
    timeout "${TESTS_TIMEOUT_S:-240}" "$PYTHON" -m pytest ${KERNEL_TESTS:-tests/kernels} ${TESTS_ARGS:-} -q -p no:cacheprovider --durations=15 -rfE \
        --deselect "tests/kernels/test_gptq_gemm.py::test_every_tuning_candidate_on_gpu[4-32-True-dtype1]" \
        --deselect "tests/kernels/test_gptq_gemm.py::test_every_tuning_candidate_on_gpu[3-128-False-dtype2]" \
        --deselect "tests/kernels/test_gptq_gemm.py::test_every_tuning_candidate_on_gpu[8--1-False-dtype3]" \
        >"$WORK/tests.log" 2>&1
    stage_done tests $?
    tail -25 "$WORK/tests.log"
fi

if has_stage floor; then
    # shellcheck disable=SC2086
    timeout "${FLOOR_TIMEOUT_S:-300}" "$PYTHON" bench/kernels/read_floor.py --out "$WORK" ${FLOOR_ARGS:-} >"$WORK/read_floor.log" 2>&1
    floor_status=$?
    stage_done floor $floor_status
    # the table, or on failure the end of the log
    if (( floor_status == 0 )); then sed -n '/^| model/,$p' "$WORK/read_floor.log"; else tail -5 "$WORK/read_floor.log"; fi
fi

if has_stage reduce; then
    timeout 120 "$PYTHON" bench/kernels/split_k_reduction.py --out "$WORK" >"$WORK/split_k_reduction.log" 2>&1
    stage_done reduce $?
    cat "$WORK/split_k_reduction.log"
fi

if has_stage profile; then
    mkdir -p "$WORK/profile"
    ncu --version >"$WORK/profile/ncu_version.txt" 2>&1
    for case in ${PROFILE_CASES:-$("$PYTHON" bench/kernels/profile_kernels.py --list)}; do
        (( $(left) < 40 )) && { echo "profile: no time left for $case" | tee -a "$WORK/stages.txt"; break; }
        rep="$WORK/profile/$case"
        timeout 120 ncu --clock-control none -k regex:gptq --launch-skip 1 --launch-count 1 \
            --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
            --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
            --section SourceCounters --import-source no -f -o "$rep" \
            "$PYTHON" bench/kernels/profile_kernels.py --case "$case" >"$rep.log" 2>&1
        stage_done "profile-$case" $?
        ncu -i "$rep.ncu-rep" --page details >"$rep.details.txt" 2>&1
        ncu -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.sass.csv" 2>&1
        "$PYTHON" bench/kernels/ncu_summary.py "$rep.sass.csv" \
            --values "$("$PYTHON" bench/kernels/profile_kernels.py --case "$case" --values)" >"$rep.summary.txt" 2>&1
        grep -E "relative error|Duration|Issue Slots Busy|Eligible Warps" "$rep.log" "$rep.details.txt"
        head -3 "$rep.summary.txt"
    done
fi

if has_stage decode; then
    timeout 200 "$PYTHON" bench/runtime/decode.py --layers 32 --steps 200 --out "$WORK" >"$WORK/decode.log" 2>&1
    stage_done decode $?
    tail -5 "$WORK/decode.log"
fi

if has_stage eval; then
    ckpt="${CKPT:-}"
    if [[ -z "$ckpt" && -n "${CKPT_PARTS:-}" ]]; then
        ckpt="$WORK/../qtool_ckpt"
        mkdir -p "$ckpt"
        cp "$CKPT_SMALL"/*.json "$CKPT_SMALL"/*.jinja "$ckpt"/ 2>/dev/null
        # shellcheck disable=SC2086
        cat $CKPT_PARTS >"$ckpt/model.safetensors"
        if [[ "$(sha256sum "$ckpt/model.safetensors" | cut -d' ' -f1)" != "$(cat "$CKPT_SMALL/model.sha256")" ]]; then
            echo "checkpoint parts do not assemble (sha256 mismatch): $CKPT_PARTS" | tee -a "$WORK/stages.txt"
            ckpt=""
        fi
    fi
    if [[ -n "$ckpt" ]]; then
        for backend in torch triton; do
            timeout 150 "$PYTHON" -c 'from qtool.cli.main import app; app()' --verbose eval "$ckpt" \
                --perplexity "${EVAL_TEXT:-$CKPT_SMALL/wiki.test.raw}" --windows "${EVAL_WINDOWS:-40}" \
                --backend "$backend" --json >"$WORK/eval_$backend.json" 2>"$WORK/eval_$backend.log"
            stage_done "eval-$backend" $?
            cat "$WORK/eval_$backend.json"; tail -3 "$WORK/eval_$backend.log"
        done
    else
        stage_done eval-no-checkpoint 1
    fi
fi

if has_stage bench || has_stage quick; then
    budget=$(( $(left) - 45 ))
    if (( budget > 30 )); then
        quick=()
        has_stage quick && quick=(--quick)
        # shellcheck disable=SC2086
        timeout $((budget + 40)) "$PYTHON" bench/kernels/kernels.py ${quick[@]+"${quick[@]}"} ${BENCH_ARGS:-} --budget-s "$budget" --out "$WORK" \
            >"$WORK/bench.log" 2>&1
        stage_done bench $?
        sed -n '/^copy bandwidth/,$p' "$WORK/bench.log"
    else
        stage_done bench-no-time 1
    fi
fi
exit "$status"
