"""`qtool eval` of a GPTQ checkpoint against the perplexity of the same file read by the test suite's independent
reader (tests/conftest.py `independently_read_float_model`, written from the format description alone), on the
protocol windows. One JSON line.

    .venv/bin/python bench/quantize/eval_agreement.py CKPT [--windows 40]
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from qtool.data.text import load_eval_text
from qtool.eval.perplexity import perplexity
from qtool.checkpoints.sources import load_model

REPO = Path(__file__).resolve().parents[2]  # bench/quantize/ -> the repo root
EVAL_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def independently_read_model(checkpoint: Path) -> torch.nn.Module:
    """The test suite's independent reading of a GPTQ checkpoint (tests/conftest.py), loaded by path: tests/ is
    not a package."""
    spec = importlib.util.spec_from_file_location("qtool_tests_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.independently_read_float_model(checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--text", default=str(EVAL_TEXT))
    args = parser.parse_args()
    started = time.perf_counter()
    printed = subprocess.run(
        [str(Path(sys.executable).parent / "qtool"), "eval", args.checkpoint, "--perplexity", args.text, "--windows", str(args.windows), "--json", "--device", "cpu"],
        capture_output=True, text=True, check=True,
    ).stdout
    qtool_ppl = json.loads(printed)["ppl"]
    qtool_seconds = time.perf_counter() - started
    tokenizer = load_model(args.checkpoint, device="cpu", dtype="float32").tokenizer
    independent = perplexity(independently_read_model(Path(args.checkpoint)), tokenizer, load_eval_text(args.text), seqlen=2048, windows=args.windows).ppl
    print(json.dumps({"checkpoint": args.checkpoint, "windows": args.windows, "qtool_eval_ppl": round(qtool_ppl, 4),
                      "independent_ppl": round(independent, 4), "delta": round(abs(qtool_ppl - independent), 4),
                      "qtool_eval_seconds": round(qtool_seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
