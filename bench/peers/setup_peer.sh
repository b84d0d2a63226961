#!/usr/bin/env bash
# Creates the peer venv (GPTQModel 7.7.0 on CPU torch 2.13) used by bench/peers/peer_*.py and the interop fixtures.
#
# GPTQModel 7.7.0 declares torch>=2.14.1, but this machine only has the CPU wheel of torch 2.13.0 (and a CUDA
# torch from PyPI is several GB). 7.7.0's pin bump is a blanket bump of every requirement; the only code that
# reads the torch version is the C++ standard picked for JIT-built extensions, which the torch backend on CPU
# does not use. So GPTQModel is installed with --no-deps and its requirements are installed with torch held
# at 2.13.0 by a constraints file. GPTQModel is pure Python at install time: nothing is compiled.
set -euo pipefail

VENV="${1:-/work/venv-peer}"
GPTQMODEL_VERSION="7.7.0"
PIP="$VENV/bin/pip"

python3 -m venv "$VENV"
# torch first: pip's configured find-links (/opt/wheels) holds the CPU wheel.
"$PIP" install "torch==2.13.0"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"

"$PIP" install --no-deps "gptqmodel==$GPTQMODEL_VERSION"
# GPTQModel 7.7.0 requirements.txt minus the torch line (python 3.11 markers resolved by hand), plus optimum
# (its [hf] extra, needed by transformers' GPTQ quantizer) and tokenizers for the fixture tokenizer.
"$PIP" install -c "$CONSTRAINTS" \
    "accelerate>=1.15.0" "numpy>=2.4.6" "safetensors>=0.8.0" "filelock>=4.2.4" "transformers>=5.20.2" \
    "threadpoolctl>=3.7.0" "packaging>=26.3" "device-smi>=0.5.7" "protobuf>=7.36.2" "pillow>=13.0.0" \
    "requests>=2.34.2" "pypcre>=0.6.4" "tokenicer>=0.0.14" "logbar>=0.4.15" "jinja2>=3.1.6" "ninja>=1.13.2" \
    "maturin>=1.15.0" "datasets>=5.1.0" "pyarrow>=26.0.0" "dill>=0.4.1" "torchao>=0.18.0" "defuser>=0.0.28" \
    "optimum>=2.3.0" "tokenizers" "gguf"

"$VENV/bin/python" -c "import torch, gptqmodel, transformers, optimum; print('torch', torch.__version__, \
'gptqmodel', gptqmodel.__version__, 'transformers', transformers.__version__)"
