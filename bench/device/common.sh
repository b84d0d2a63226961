# The start every bench/device/*.sh shares on the lent machine, sourced first thing after `set -uo pipefail`:
#   OUT_DEFAULT=/tmp/x_out LOG_NAME=x.log source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# It sets REPO (the repo root, the working directory from here on), OUT (the environment's, else OUT_DEFAULT;
# created), LOG ($OUT/$LOG_NAME), BEGAN; compiles the Triton kernels (TRITON_INTERPRET unset), unbuffers Python and
# puts the repo on PYTHONPATH (the package is its qtool/ folder: no install). Functions:
#   log MESSAGE...           "== MESSAGE at N s" on stdout and appended to LOG
#   install_wheels SITE WHEEL...
#                            carried wheels installed into SITE (no index, no dependencies), SITE put on PYTHONPATH
#                            after the repo; returns pip's exit status (the caller says what a failure means)
#   add_site SITE            SITE on PYTHONPATH after the repo (once)
#   install_peer SITE WHEEL...
#                            a peer's carried wheels into a SITE of its own, kept off PYTHONPATH (the bench puts it
#                            there for that peer's stage only); returns pip's exit status
#   use_carried_pcre DIR     PyPcre (GPTQModel's) links libpcre2-8.so.0: the image's if it has one, else the copy
#                            carried in DIR (on LD_LIBRARY_PATH)
#   limit SECONDS            SECONDS, or what is left before DEADLINE_S (seconds after the start; default none) if less
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # bench/device/ -> the repo root
export OUT="${OUT:-${OUT_DEFAULT:-/tmp/device_out}}"  # exported: a script run by another writes beside it
LOG="$OUT/${LOG_NAME:-device.log}"
mkdir -p "$OUT"
cd "$REPO" || exit 1
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BEGAN=$SECONDS

log() { echo "== $* at $((SECONDS - BEGAN)) s" | tee -a "$LOG"; }

limit() {
    local left=$(( ${DEADLINE_S:-1000000} - (SECONDS - BEGAN) ))
    (( left < 5 )) && left=5
    echo $(( left < $1 ? left : $1 ))
}

install_wheels() {
    local site=$1 status
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@"
    status=$?
    add_site "$site"
    return $status
}

add_site() {
    [[ ":$PYTHONPATH:" == *":$1:"* ]] || export PYTHONPATH="$REPO:$1${PYTHONPATH#"$REPO"}"
}

install_peer() {
    local site=$1
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$@"
}

use_carried_pcre() {
    ldconfig -p | grep -q libpcre2-8.so.0 || export LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
