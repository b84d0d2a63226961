#!/usr/bin/env bash
# bench/finetune/qlora_step.py on the lent GPU machine (no network), after the grad-input kernel tests compiled.
# bitsandbytes comes from a carried wheel (it is not in the machine's image); prepare it here once:
#   mkdir -p .whl/finetune && cp /tmp/pd/bitsandbytes-*.whl .whl/finetune/      (carry: .whl/finetune)
#   bash bench/device/qlora_step.sh [qlora_step.py args, e.g. --steps 3 --systems qtool-dequant,bnb-nf4]
# Limits, each 0 to skip its part: TESTS_LIMIT_S (170, the kernel tests), LINEARS_LIMIT_S (0: off unless asked, the
# per-linear timings of bench/finetune/qlora_linears.py), BENCH_LIMIT_S (400, the step bench). One call of the run
# tool has 600 s: all three parts take two calls, e.g.
#   TESTS_LIMIT_S=240 LINEARS_LIMIT_S=120 BENCH_LIMIT_S=0 bash bench/device/qlora_step.sh
#   TESTS_LIMIT_S=0 PROFILE=1 bash bench/device/qlora_step.sh --systems qtool-fused,qtool-dequant,bnb-nf4
# PROFILE=1: one more step of each system under torch.profiler (bench/finetune/step_profile.py): kernel time by
# category, the top 20 kernels, the GPU's idle gaps, printed and in $OUT/qlora_step_profile.json.
# Results: $OUT/qlora_step.jsonl (one line per system and a comparison line), $OUT/qlora_linears.jsonl (one line
# per 7B linear shape: dense floor, dequantize kernel, dequant backend, fused LoRA, Triton path) and $OUT/qlora_step.log.
set -uo pipefail
OUT_DEFAULT=/tmp/qlora_step_out LOG_NAME=qlora_step.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if ! install_wheels /tmp/qlora_site .whl/finetune/bitsandbytes-*.whl >>"$LOG" 2>&1; then
    echo "bitsandbytes wheel not installed (.whl/finetune carried?): its row will say it is missing" | tee -a "$LOG"
fi
PROFILE_ARGS=()
[[ "${PROFILE:-0}" == 1 ]] && PROFILE_ARGS=(--profile "$OUT/qlora_step_profile.json")
log "kernel tests"
[[ "${TESTS_LIMIT_S:-170}" == 0 ]] || timeout "${TESTS_LIMIT_S:-170}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gptq_grad_input.py \
    tests/kernels/test_exl2_grad_input.py tests/kernels/test_quantized_autograd.py tests/kernels/test_gptq_dequant.py \
    tests/kernels/test_low_rank_autograd.py tests/kernels/test_train_ops.py 2>&1 | tail -15 | tee -a "$LOG"
log "linears"
[[ "${LINEARS_LIMIT_S:-0}" == 0 ]] || timeout "${LINEARS_LIMIT_S:-0}" python3 bench/finetune/qlora_linears.py --out "$OUT/qlora_linears.jsonl" 2>&1 | grep -v Warning | tee -a "$LOG"
log "bench"
[[ "${BENCH_LIMIT_S:-400}" == 0 ]] || timeout "${BENCH_LIMIT_S:-400}" python3 bench/finetune/qlora_step.py --out "$OUT/qlora_step.jsonl" \
    ${PROFILE_ARGS[@]+"${PROFILE_ARGS[@]}"} "$@" 2>&1 | grep -v Warning | tee -a "$LOG"
log done
