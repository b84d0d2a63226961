#!/usr/bin/env bash
# bench/finetune/qlora_step.py on the lent GPU machine (no network), after the grad-input kernel tests compiled.
# bitsandbytes comes from a carried wheel (it is not in the machine's image); prepare it here once:
#   mkdir -p .whl/finetune && cp /tmp/pd/bitsandbytes-*.whl .whl/finetune/      (carry: .whl/finetune)
#   bash bench/device/qlora_step.sh [qlora_step.py args, e.g. --steps 3 --systems qtool-dequant,bnb-nf4 --profile]
# Limits, each 0 to skip its part: TESTS_LIMIT_S (170, the kernel tests), LINEARS_LIMIT_S (0: off unless asked, the
# per-linear timings of bench/finetune/qlora_linears.py), BENCH_LIMIT_S (400, the step bench). One call of the run
# tool has 600 s: all three parts take two calls, e.g.
#   TESTS_LIMIT_S=240 LINEARS_LIMIT_S=120 BENCH_LIMIT_S=0 bash bench/device/qlora_step.sh
#   TESTS_LIMIT_S=0 bash bench/device/qlora_step.sh --profile
# Results: $OUT/qlora_step.jsonl (one line per system and a comparison line), $OUT/qlora_linears.jsonl (one line
# per 7B linear shape: dense floor, dequantize kernel, dequant backend, fused LoRA, Triton path) and $OUT/qlora_step.log; with
# --profile, $OUT/qlora_step_profile_<system>.txt (each system's ops by GPU time over one step).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # bench/device/ -> the repo root
OUT="${OUT:-/tmp/qlora_step_out}"
SITE=/tmp/qlora_site
LOG="$OUT/qlora_step.log"
mkdir -p "$OUT"
cd "$REPO"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
if ! python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/finetune/bitsandbytes-*.whl >>"$LOG" 2>&1; then
    echo "bitsandbytes wheel not installed (.whl/finetune carried?): its row will say it is missing" | tee -a "$LOG"
fi
export PYTHONPATH="$REPO:$SITE"
echo "== kernel tests" | tee -a "$LOG"
[[ "${TESTS_LIMIT_S:-170}" == 0 ]] || timeout "${TESTS_LIMIT_S:-170}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gptq_grad_input.py \
    tests/kernels/test_exl2_grad_input.py tests/kernels/test_quantized_autograd.py tests/kernels/test_gptq_dequant.py \
    tests/kernels/test_low_rank_autograd.py 2>&1 | tail -15 | tee -a "$LOG"
echo "== linears" | tee -a "$LOG"
[[ "${LINEARS_LIMIT_S:-0}" == 0 ]] || timeout "${LINEARS_LIMIT_S:-0}" python3 bench/finetune/qlora_linears.py --out "$OUT/qlora_linears.jsonl" 2>&1 | grep -v Warning | tee -a "$LOG"
echo "== bench" | tee -a "$LOG"
[[ "${BENCH_LIMIT_S:-400}" == 0 ]] || timeout "${BENCH_LIMIT_S:-400}" python3 bench/finetune/qlora_step.py --out "$OUT/qlora_step.jsonl" "$@" 2>&1 | grep -v Warning | tee -a "$LOG"
