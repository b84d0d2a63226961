#!/usr/bin/env bash
# One device call for issue 23's open rows, the deciding measurements first, each under its own limit and all
# under DEADLINE_S (default 560):
#   0. the kernels written since the last GPU call (q8 cache ops, the GPTQ block kernel) against their references
#   1. the CUDA GEMV: build + its GPU tests; read_floor.py at M = 1 (Triton GEMV vs CUDA GEMV vs read-only, every
#      Llama-2 shape, one run)
#   2. the 7B-shaped 4-bit decode (fused projections, CUDA graphs) with the CUDA GEMV (the Hopper default) and with
#      QTOOL_CUDA_KERNELS=off (the Triton GEMV), same call: which default the GEMV rule keeps
#   3. the prefix scenario with a hit's new tokens as decode rows (--short-prefill-rows 64, the default) and as a
#      ragged prefill step (0)
#   4. SmolLM2 `run` (its 64-token prompt now a graph replay of decode rows) against HF generate
#   5. the engine's CUDA-graph tests (short chunks as rows against the prefill path, the q8 cache's kernels in the
#      graphs)
#   6. the 7B-shaped decode with a q8 KV cache (its own decode kernels) against fp16
# and, named in STAGES only (a second call): speculative (prompt lookup against plain decode on SmolLM2's shape:
# random weights, so acceptance is a random model's), throughput (256 requests on the 7B shape against HF's padded
# batch and ExLlamaV2 0.3.2's dynamic generator where its wheel in .whl/runtime builds).
# and qlora (issue 24: the QLoRA step through the fused training forward, the dequant backend under transformers'
# forward and bitsandbytes, one profiled step each; its kernels' tests first; carry .whl/finetune too).
# Carry: .device-data/runtime-small .whl/runtime (bench/device/prepare_carry.sh)
#   bash bench/device/engine_call.sh                              -> $OUT/engine_call.log and each step's files
#   STAGES="speculative throughput" bash bench/device/engine_call.sh
set -uo pipefail
OUT_DEFAULT=/tmp/engine_call_out LOG_NAME=engine_call.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export QTOOL_CACHE_DIR=/tmp/qtool_cache MAX_JOBS=16  # the built extension is found again by later steps
DEADLINE_S="${DEADLINE_S:-560}"
DATA="$REPO/.device-data/runtime-small"
WORK=/tmp/runtime_work
mkdir -p "$WORK"
install_wheels /tmp/runtime_site .whl/runtime/gguf-*.whl >/dev/null 2>&1

stage_gemv() {
    log "cuda gemv: build + tests"
    timeout "$(limit 150)" python3 -m pytest -q -p no:cacheprovider -rfE -x tests/kernels/test_gptq_gemv_cuda.py \
        >"$OUT/cuda_gemv_tests.log" 2>&1
    log "cuda gemv tests: exit $?"; tail -4 "$OUT/cuda_gemv_tests.log" | tee -a "$LOG"
    log "read floor at M = 1, Triton GEMV against CUDA GEMV"
    (cd bench/kernels && timeout "$(limit 100)" python3 read_floor.py --m 1 --by-kind gemv,cuda_gemv --out "$OUT") \
        2>&1 | grep -vE '^\{' | tail -12 | tee -a "$LOG"
}

stage_decode() {
    local kernels
    for kernels in on off; do
        log "7B decode, fused, CUDA kernels $kernels"
        QTOOL_CUDA_KERNELS=$kernels timeout "$(limit 90)" python3 bench/runtime/engine_decode.py --fusion on \
            --ways graphs --repeats 2 --out "$OUT/engine_decode_cuda_$kernels.json" 2>&1 \
            | grep -vE '^(Writing|Loading)' | tail -6 | tee -a "$LOG"
    done
}

stage_prefix() {
    local rows
    for rows in 64 0; do
        log "prefix, short prefill rows $rows"
        timeout "$(limit 50)" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench_prefix.jsonl" \
            --work "$WORK" --scenario prefix --short-prefill-rows $rows 2>&1 | tee -a "$LOG" | grep -E '^\| prefix|rror'
    done
}

smol() {  # smol LIMIT_S runtime_bench args...: a scenario on SmolLM2's shape with random weights
    local seconds=$1
    shift
    timeout "$(limit "$seconds")" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench.jsonl" --work "$WORK" \
        --smol-shape "$DATA/smollm2-shape" --data "$DATA" --calibration-samples 8 "$@" 2>&1 | tee -a "$LOG" \
        | grep -E '^\||rror'
}

stage_run() {
    log "smollm2 run"
    smol 100 --skip-exllamav2 "not run: engine call" --fusion on --scenario smollm2-run
}

stage_kvq8() {
    log "7B decode with a q8 KV cache (its decode kernels) against fp16"
    timeout "$(limit 90)" python3 bench/runtime/engine_decode.py --fusion on --ways graphs --repeats 2 \
        --kv-cache auto q8 --out "$OUT/engine_decode_q8.json" 2>&1 | grep -vE '^(Writing|Loading)' | tail -6 \
        | tee -a "$LOG"
}

stage_kernels() {
    log "the kernels not yet compiled on a GPU: q8 cache ops, the GPTQ block (and GPTQ through it)"
    timeout "$(limit 90)" python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_engine_ops_q8.py \
        tests/kernels/test_gptq_block.py tests/quant/test_gptq.py::test_cuda_matches_cpu \
        tests/quant/test_exl2_solver.py::test_candidate_errors_on_the_gpu_match_the_cpu >"$OUT/kernel_tests.log" 2>&1
    log "kernel tests: exit $?"; tail -4 "$OUT/kernel_tests.log" | tee -a "$LOG"
}

stage_tests() {
    log "engine graph tests"
    timeout "$(limit 150)" python3 -m pytest -q -p no:cacheprovider -rfE tests/runtime/engine/test_cuda_graphs.py \
        >"$OUT/graph_tests.log" 2>&1
    log "graph tests: exit $?"; tail -4 "$OUT/graph_tests.log" | tee -a "$LOG"
}

stage_qlora() {  # carry .whl/finetune too (bitsandbytes)
    log "qlora step, 7B shape: fused forward, dequant backend under transformers' forward, bitsandbytes NF4"
    install_wheels /tmp/qlora_site .whl/finetune/bitsandbytes-*.whl >/dev/null 2>&1 || log "bitsandbytes not installed"
    timeout "$(limit 60)" python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_train_ops.py \
        >"$OUT/train_ops_tests.log" 2>&1
    log "train ops tests: exit $?"; tail -3 "$OUT/train_ops_tests.log" | tee -a "$LOG"
    timeout "$(limit 200)" python3 bench/finetune/qlora_step.py --out "$OUT/qlora_step.jsonl" --steps 3 \
        --systems qtool-fused,qtool-dequant,bnb-nf4 --profile "$OUT/qlora_step_profile.json" 2>&1 | grep -v Warning \
        | tail -40 | tee -a "$LOG"
}

stage_speculative() {
    log "speculative, prompt lookup against plain"
    smol 120 --skip-exllamav2 "not run: engine call" --scenario speculative
}

stage_throughput() {
    log "throughput, 7B shape: engine, HF padded batch, ExLlamaV2 where it builds"
    install_wheels /tmp/runtime_site .whl/runtime/exllamav2-*.whl >/dev/null 2>&1 || log "exllamav2 wheel not installed"
    timeout "$(limit 400)" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench.jsonl" --work "$WORK" \
        --scenario throughput --requests 256 --engine-budget-s 90 --hf-requests 16 2>&1 | tee -a "$LOG" \
        | grep -E '^\||rror'
}

for stage in ${STAGES:-kernels gemv decode prefix run tests kvq8}; do
    "stage_$stage"
done
log done
