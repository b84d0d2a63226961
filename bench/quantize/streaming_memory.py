"""Host (and GPU) memory of `qtool quantize` with the float weights loaded whole against streamed layer by layer,
and with the calibration activations forced onto each tier: every variant runs in a process of its own, which
reports its peak resident set size (and torch.cuda.max_memory_allocated on a GPU) beside the estimate made before
the run, and the sha256 of every file it wrote (streaming and the tiers must not change a byte). One JSON line per
run, and a table.

    .venv/bin/python bench/quantize/streaming_memory.py                       # SmolLM2, CPU, 16 x 512 calibration
    .venv/bin/python bench/quantize/streaming_memory.py --device cuda --samples 128 --out $OUT   (on the GPU)
    .venv/bin/python bench/quantize/streaming_memory.py --tiny                 # a tiny random Llama: checks the script
    .venv/bin/python bench/quantize/streaming_memory.py --format exl2 --bpw 4.0 [--measurement M]   (EXL2, the
        CLI's exl2 preset; with M, an earlier measurement.json, the measurement pass is skipped)

Sources: the `smollm2-135m` GGUF file, and the same weights as a float Hugging Face directory in bfloat16
safetensors shards of 50 MB (written once into --work), the form large models come in. The first run, `floor`,
imports what a run imports and loads nothing: the resident memory no run can go below."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CALIBRATION = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"

CHILD = r"""
import json, resource, sys, time
from dataclasses import replace
import torch
from qtool.config.schema import QUANTIZE_EXL2_PRESET, CalibrationConfig, QuantConfig, resolve_config
from qtool.quant.exl2_pipeline import quantize_model_exl2
from qtool.quant.pipeline import quantize_model

args = json.loads(sys.argv[1])
if args["variant"] == "floor":
    print(json.dumps({"peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    sys.exit(0)
torch.set_num_threads(args["threads"]) if args["threads"] else None
calibration = CalibrationConfig(source=args["calibration"], samples=args["samples"], seqlen=args["seqlen"], seed=0)
started = time.perf_counter()
if args["format"] == "exl2":  # the CLI's path from flags to a config: the exl2 preset, then the flags
    config, _ = resolve_config(QUANTIZE_EXL2_PRESET, {"output_format": "exl2", "bpw": args["bpw"], "calibration_source": args["calibration"],
                                                      "samples": args["samples"], "seqlen": args["seqlen"], "seed": 0})
    result = quantize_model_exl2(args["model"], config, args["output"], measurement=args["measurement"], device=args["device"], force=True,
                                 streaming=args["streaming"], activation_tier=args["tier"])
else:
    config = replace(QuantConfig(calibration=calibration), bits=4, group_size=128)
    result = quantize_model(args["model"], config, args["output"], device=args["device"], force=True,
                            streaming=args["streaming"], activation_tier=args["tier"])
print(json.dumps({"seconds": time.perf_counter() - started, "memory": result.memory, "peak_memory_bytes": result.peak_memory_bytes,
                  "estimated_peak_memory_bytes": result.estimated_peak_memory_bytes}))
"""


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


WRITE_FLOAT_COPY = r"""
import sys, torch
from qtool.checkpoints.sources import load_model
model, target, max_shard = sys.argv[1:]
loaded = load_model(model, dtype="float32")
loaded.model.to(torch.bfloat16).save_pretrained(target, max_shard_size=max_shard)
loaded.tokenizer.save_pretrained(target)
"""


def float_directory(model: str, work: Path, max_shard: str) -> Path:
    """The GGUF model as a float HF directory (bfloat16 safetensors shards), written once, by a process of its own:
    Linux carries a process's peak resident size across exec, so the runs this script starts must come from a
    process that never held a model."""
    target = work / "float-bf16"
    if not (target / "config.json").exists():
        subprocess.run([sys.executable, "-c", WRITE_FLOAT_COPY, model, str(target), max_shard], check=True, cwd=REPO)
    return target


def tiny_directory(work: Path) -> tuple[Path, Path]:
    """A tiny random Llama directory (sharded) and a calibration text of its words."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = work / "tiny"
    words = "the quick brown fox jumps over lazy dog what is capital of france paris river city old new".split()
    text = work / "tiny-calibration.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(100)))
    if not (target / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(str(target), max_shard_size="40KB")
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.train_from_iterator([" ".join(words)] * 10, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>"]))
        PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<s>", unk_token="<unk>").save_pretrained(str(target))
    return target, text


def run(python: str, variant: str, args: dict, out: Path) -> dict:
    payload = dict(args, variant=variant, output=str(out))
    started = time.perf_counter()
    done = subprocess.run([python, "-c", CHILD, json.dumps(payload)], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(variant=variant, source=args.get("source_name"), wall_s=round(time.perf_counter() - started, 1))
    if out.exists():
        row["files"] = file_hashes(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--format", choices=["gptq", "exl2"], default="gptq", help="gptq: 4-bit g128; exl2: --bpw with the exl2 preset")
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--measurement", default=None, help="exl2: an earlier measurement.json (skips the measurement pass)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    parser.add_argument("--sources", default="gguf,safetensors", help="which sources to run: gguf, safetensors or both")
    parser.add_argument("--weights", default="whole,streamed", help="which weight paths to run: whole, streamed or both")
    parser.add_argument("--tiers", default="", help="also force these activation tiers on the streamed safetensors source, e.g. host,disk")
    parser.add_argument("--max-shard", default="50MB", help="shard size of the float safetensors copy")
    parser.add_argument("--work", default=None, help="folder for the float copy and the outputs (default: a temporary one)")
    parser.add_argument("--out", default=None, help="folder to write streaming_memory.jsonl into")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama and 4 x 32 calibration: checks the script on the CPU")
    options = parser.parse_args()
    work = Path(options.work or tempfile.mkdtemp(prefix="qtool-streaming-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if options.tiny:
        directory, calibration = tiny_directory(work)
        sources = {"safetensors": str(directory)}
        samples, seqlen = 4, 32
    else:
        wanted = options.sources.split(",")
        sources = {"gguf": options.model} if "gguf" in wanted else {}
        if "safetensors" in wanted:
            sources["safetensors"] = str(float_directory(options.model, work, options.max_shard))
        calibration, samples, seqlen = CALIBRATION, options.samples, options.seqlen
    common = {"calibration": str(calibration), "samples": samples, "seqlen": seqlen, "device": options.device,
              "threads": options.threads, "tier": None, "format": options.format, "bpw": options.bpw,
              "measurement": options.measurement and str(Path(options.measurement).resolve())}
    machine = {"python": platform.python_version(), "machine": platform.machine(), "device": options.device, "samples": samples, "seqlen": seqlen,
               "format": options.format, "bpw": options.bpw if options.format == "exl2" else None, "measurement": options.measurement}
    rows: list[dict] = []

    def record(row: dict) -> None:
        """Keep the row and append it to the JSONL at once: a long run interrupted keeps what it measured."""
        row["machine"] = machine
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "files"}), file=sys.stderr, flush=True)
        if options.out:
            Path(options.out).mkdir(parents=True, exist_ok=True)
            with open(Path(options.out) / "streaming_memory.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")

    record(run(sys.executable, "floor", common, work / "floor"))
    for name, model in sources.items():
        for streaming in [s == "streamed" for s in options.weights.split(",")]:
            variant = "streamed" if streaming else "whole"
            record(run(sys.executable, variant, dict(common, model=model, streaming=streaming, source_name=name), work / f"{name}-{variant}"))
        for tier in filter(None, options.tiers.split(",")):
            record(run(sys.executable, f"streamed, activations {tier}",
                       dict(common, model=model, streaming=True, tier=tier, source_name=name), work / f"{name}-{tier}"))
    print(f"| source | weights | activations | host peak MiB | estimated host MiB | {options.device} peak MiB | s | same files as whole |")
    print("|---|---|---|---|---|---|---|---|")
    floor = rows[0]["peak_host_bytes"]
    print(f"| (imports only) | | | {floor / 2**20:.0f} | | | | |")
    whole_files = {row["source"]: row.get("files") for row in rows if row["variant"] == "whole"}
    for row in rows[1:]:
        memory, estimate = row["memory"], row["memory"]["estimate"]
        same = "n/a" if row["source"] not in whole_files else "yes" if row.get("files") == whole_files[row["source"]] else "NO"
        print(f"| {row['source']} | {'streamed' if estimate['streaming'] else 'whole'} | {estimate['activation_tier']}"
              f"{'' if estimate['replay'] else ' (no replay)'} | {memory['peak_host_bytes'] / 2**20:.0f} | {estimate['cpu_bytes'] / 2**20:.0f} | "
              f"{memory['peak_device_bytes'] / 2**20:.0f} | {row['seconds']:.1f} | {same} |")
    if any(row.get("files") != whole_files[row["source"]] for row in rows[1:] if row["source"] in whole_files):
        raise SystemExit("a variant wrote other bytes than the whole-model run")


if __name__ == "__main__":
    main()
