#!/usr/bin/env bash
# On a CUDA machine without network: install exllamav2 0.3.2 (+ fastparquet, cramjam for its converter) from
# wheels in .whl/exl2 (fetched where PyPI is reachable:
#   pip download --no-deps exllamav2==0.3.2 -d .whl/exl2
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl/exl2 fastparquet cramjam ),
# build its extension in the background while the Triton EXL2 kernel tests run compiled, then run
# bench/peers/exl2_interop.py. Results go to $OUT (default /tmp/exl2_interop_out).
set -uo pipefail
OUT_DEFAULT=/tmp/exl2_interop_out source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
install_wheels /tmp/exl2_site .whl/exl2/*.whl || exit 3

began=$SECONDS
( python3 -c 'import exllamav2.ext' >"$OUT/build.log" 2>&1; echo "build exit $? after $((SECONDS - began)) s" >>"$OUT/build.log" ) &
build=$!
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_exl2_triton.py tests/kernels/test_exl2_linear.py 2>&1 | tail -20 | tee "$OUT/pytest.txt"
wait $build
tail -5 "$OUT/build.log"
timeout "${INTEROP_TIMEOUT:-400}" python3 bench/peers/exl2_interop.py --work /tmp/exl2_work --out "$OUT/exl2_interop.json" "$@" 2>&1 | tee "$OUT/interop.log" | tail -60
cp /tmp/exl2_work/converter.log "$OUT/" 2>/dev/null
exit 0
