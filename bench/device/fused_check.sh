#!/usr/bin/env bash
# One device call for the fused q/k/v and gate/up projections (the engine's default) and fast prefill (off until this
# call's CUDA test passes): their CUDA tests first, then the 7B-shaped decode and SmolLM2 `run` fused against unfused, the prefix TTFT, the host
# time of a prefill step with and without fast prefill, and the decode kernel profile. Most important first; each part
# under its own limit (~7 minutes), all under DEADLINE_S if set. The GPU tests include the q4 KV cache's kernels and
# its CUDA-graph decode step. The prefix scenario runs with a hit's new tokens as decode rows (the default) and without.
# Carry: .device-data/runtime-small .whl/runtime
#   bash bench/device/fused_check.sh     -> $OUT/*.json[l], $OUT/fused_check.log, $OUT/gpu_tests.log
set -uo pipefail
OUT_DEFAULT=/tmp/fused_check_out LOG_NAME=fused_check.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATA="$REPO/.device-data/runtime-small"
WORK=/tmp/runtime_work
mkdir -p "$WORK"
install_wheels /tmp/runtime_site .whl/runtime/gguf-*.whl >/dev/null 2>&1
log "gpu tests"
timeout "$(limit ${TESTS_LIMIT_S:-150})" python3 -m pytest -q -p no:cacheprovider -rfE \
    "tests/runtime/engine/test_step_overhead.py::test_a_mixed_step_on_the_gpu_through_the_fused_ops_equals_the_module_path" \
    "tests/runtime/engine/test_fused_projections.py::test_on_the_gpu_fused_triton_steps_agree_with_unfused_ones" \
    tests/runtime/engine/test_cuda_graphs.py tests/kernels/test_engine_ops_q4.py >"$OUT/gpu_tests.log" 2>&1
log "gpu tests: exit $?"; tail -6 "$OUT/gpu_tests.log" | tee -a "$LOG"
log "7B decode fused vs unfused"
timeout "$(limit ${DECODE_LIMIT_S:-110})" python3 bench/runtime/engine_decode.py --fusion both --ways graphs --repeats 2 \
    --out "$OUT/engine_decode_fusion.json" 2>&1 | grep -vE '^(Writing|Loading)' | tail -12 | tee -a "$LOG"
log "smollm2 run fused vs unfused; prefix with fast prefill on, off"
timeout "$(limit ${RUN_LIMIT_S:-120})" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench_fusion.jsonl" --work "$WORK" \
    --smol-shape "$DATA/smollm2-shape" --data "$DATA" --skip-exllamav2 "not run: fused check call" --fusion both \
    --scenario smollm2-run --calibration-samples 8 --fast-prefill on 2>&1 | tee -a "$LOG" | grep -E '^\||rror'
# the prefix hit's 32 new tokens as decode rows replayed from the graphs (the default), against the ragged prefill step
for rows in 64 0; do
    timeout "$(limit ${PREFIX_LIMIT_S:-40})" python3 bench/runtime/runtime_bench.py --out "$OUT/runtime_bench_prefix.jsonl" --work "$WORK" \
        --scenario prefix --short-prefill-rows $rows 2>&1 | tee -a "$LOG" | grep -E '^\| prefix|rror'
done
log "prefill host time: fast prefill on, off"
for flag in "--fast-prefill on" "--fast-prefill off"; do
    timeout "$(limit ${OVERHEAD_LIMIT_S:-45})" python3 bench/runtime/engine_overhead.py --device cuda --out "$OUT/engine_overhead.jsonl" \
        --model "$WORK/smollm2-gptq-4bit" --path decode-step --requests 3 $flag 2>&1 | grep -E '^\|' | tail -1 | tee -a "$LOG"
done
log "decode kernel profile, fused vs unfused"
timeout "$(limit ${PROFILE_LIMIT_S:-70})" python3 bench/runtime/decode_profile.py --fusion both --out "$OUT/decode_profile_fusion.json" \
    2>&1 | tail -40 | tee -a "$LOG"
log done
