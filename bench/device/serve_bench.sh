#!/usr/bin/env bash
# bench/serve/serve_bench.py on the lent GPU machine. Its image has torch, transformers, anyio, h11, httpx and click
# but not fastapi, starlette, uvicorn or pydantic: they travel as wheels (cp312, manylinux), fetched here first.
#   bash bench/device/serve_bench.sh wheels     (here, on the developers' machine: .whl/serve, about 3 MB)
#   bash bench/device/serve_bench.sh [serve_bench.py args]       (there; carry .whl/serve)
#       -> $OUT/serve_bench.jsonl, $OUT/serve_bench.log
# Defaults: 128 concurrent HTTP clients, prompts of 128-1024 random ids, 256 new tokens each (eos ignored, greedy),
# a 30 GiB KV cache, on a Llama-2-7B-shaped model with random 4-bit g128 GPTQ linears; about 3-5 minutes.
set -uo pipefail
OUT_DEFAULT=/tmp/serve_bench_out LOG_NAME=serve_bench.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WHEELS="$REPO/.whl/serve"
# the versions the project's venv runs (fastapi's own needs beside the image's packages)
PINS=(fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5
      annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.3 annotated-doc)
if [[ "${1:-}" == wheels ]]; then
    mkdir -p "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${PINS[@]}" && ls "$WHEELS"
    exit
fi
install_wheels /tmp/serve_site "$WHEELS"/*.whl \
    || { echo "wheel install failed: run 'bash bench/device/serve_bench.sh wheels' here and carry .whl/serve"; exit 2; }
timeout "${SERVE_LIMIT_S:-560}" python3 bench/serve/serve_bench.py --out "$OUT/serve_bench.jsonl" "$@" 2>&1 \
    | tee "$OUT/serve_bench.log" | grep -E '^\||rror'
