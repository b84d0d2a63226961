"""Issue 26's quality against the peers on real weights, on one GPU in one run: SmolLM2-135M-Instruct (the GGUF,
dequantized, written as a float16 Hugging Face directory) quantized by qtool and by each peer with the protocol's
calibration (128 x 512 tokens of wiki.valid.tokens), and every output's perplexity read by one evaluator (qtool's,
the first 40 windows of 2048 tokens of wiki.test.raw), so a difference is the quantizer's alone:
    EXL2 at 4.0 / 3.0 / 2.5 / 5.0 bpw: qtool against ExLlamaV2 0.3.2's converter. Each tool measures once (at the
        first target) and reuses that measurement for the others, as both tools' users do; both quantize the head
        at 6 bits (ExLlamaV2's default -hb 6; qtool's head_bits=6), so the heads match.
    GPTQ 4-bit and 3-bit g128: qtool's shipped defaults against GPTQModel 7.7.0 (4/3-bit g128 sym, its defaults).

    python bench/quantize/peer_quality.py plan --gguf SmolLM2.gguf --data DIR --work W --out rows.jsonl
        [--only exl2 ...] [--deadline-s 530] [--gptqmodel-site S] [--exllamav2-site S]
    (bench/device/peer_quality.sh assembles the GGUF and installs the peers on the lent GPU machine)
    python bench/quantize/peer_quality.py plan ... --tiny      the same plan on the CPU: a tiny random Llama in place
                                                               of SmolLM2, 8 x 64 calibration, 2 x 64 windows

Every stage runs in its own process (big_model.py's runner: time, host and GPU peaks; a failing or timed-out stage
is a row saying so and the plan goes on). The quantizing stages are big_model.py's own (`qtool`, `gptqmodel`,
`exllamav2`); this script adds `float` (the GGUF to a float16 directory) and `ppl` (one output's perplexity and
stored bits per weight). Rows: one JSON line each (--out) and a markdown table of ppl against bpw on stdout.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import big_model  # noqa: E402  (bench/quantize/ is no package: its runner and quantizing stages)

EXL2_TARGETS = (4.0, 3.0, 2.5, 5.0)  # the first target's run measures, the others reuse its measurement
GPTQ_BITS = (4, 3)
HEAD_BITS = 6  # ExLlamaV2's converter default (-hb 6); qtool's head_bits set to match
CALIBRATION_FILE = "wiki.valid.tokens"
EVAL_FILE = "wiki.test.raw"
PROTOCOL = {"samples": 128, "seqlen": 512, "windows": 40, "eval_seqlen": 2048}
TINY_PROTOCOL = {"samples": 8, "seqlen": 64, "windows": 2, "eval_seqlen": 64}


@dataclass
class Step:
    """One stage: the row's name, the script and stage it runs, its arguments and time limit; `quantizes` marks
    the stages whose output a later `ppl` step reads (skipped when that output was not written)."""

    row: str
    script: Path
    stage: str
    argv: list[str]
    limit_s: float
    site: str | None = None
    needs: str | None = None
    min_s: float = 20.0
    reads: str | None = None  # the output directory a ppl step evaluates
    facts: dict[str, Any] = field(default_factory=dict)  # what the row is: tool, format, target


def plan_steps(work: Path, data: Path, gguf: str | None, tiny: bool, device: str, sites: dict[str, str],
               only: list[str] | None) -> list[Step]:
    """float -> its ppl; EXL2 per target: qtool, ExLlamaV2, each then its ppl; GPTQ per bit width: qtool,
    GPTQModel, each then its ppl. `only`: the steps whose row holds one of these words (the float model's steps
    run unless an earlier call wrote it: every other step reads it)."""
    protocol = TINY_PROTOCOL if tiny else PROTOCOL
    here, quantizers = Path(__file__).resolve(), Path(big_model.__file__).resolve()
    float_dir = work / "float"
    calibration = ["--calibration", str(data / CALIBRATION_FILE), "--samples", str(protocol["samples"]),
                   "--seqlen", str(protocol["seqlen"]), "--device", device]
    source = ["--tiny"] if tiny else ["--gguf", str(gguf)]
    steps = [Step("float16 SmolLM2" if not tiny else "float tiny", here, "float", [*source, "--dir", str(float_dir)], 240,
                  min_s=5, facts={"tool": "float"})]

    def ppl(of: Step, output: Path) -> Step:
        argv = ["--model", str(output), "--text", str(data / EVAL_FILE), "--windows", str(protocol["windows"]),
                "--seqlen", str(protocol["eval_seqlen"]), "--device", device]
        return Step(f"ppl of {of.row}", here, "ppl", argv, 180, min_s=10, reads=str(output), facts=dict(of.facts))

    steps.append(ppl(steps[0], float_dir))
    if (float_dir / "config.json").exists() and any(float_dir.glob("*.safetensors")):
        steps = []  # written and evaluated by an earlier call of the plan on this machine (a plan spans calls)
    exl2: list[Step] = []
    for index, bpw in enumerate(EXL2_TARGETS):
        ours_out, theirs_out = work / f"qtool-exl2-{bpw:g}", work / f"exllamav2-{bpw:g}"
        ours_argv = ["--model", str(float_dir), "--output", str(ours_out), "--format", "exl2", "--bpw", str(bpw),
                     "--set", f"head_bits={HEAD_BITS}", *calibration]
        theirs_argv = ["--model", str(float_dir), "--output", str(theirs_out), "--bpw", str(bpw),
                       "--head-bits", str(HEAD_BITS), *calibration]
        if index:  # reuse the first target's measurement (each tool its own)
            ours_argv += ["--measurement", str(work / f"qtool-exl2-{EXL2_TARGETS[0]:g}" / "measurement.json")]
            theirs_argv += ["--measurement", str(work / f"exllamav2-{EXL2_TARGETS[0]:g}.work" / "measurement.json")]
        ours = Step(f"qtool exl2 {bpw:g} bpw", quantizers, "qtool", ours_argv, 420, reads=None,
                    facts={"tool": "qtool", "format": "exl2", "target": bpw})
        theirs = Step(f"ExLlamaV2 exl2 {bpw:g} bpw", quantizers, "exllamav2", theirs_argv, 420,
                      site=sites.get("exllamav2"), needs="exllamav2", min_s=60,
                      facts={"tool": "exllamav2", "format": "exl2", "target": bpw})
        exl2 += [ours, ppl(ours, ours_out), theirs, ppl(theirs, theirs_out)]
    gptq: list[Step] = []
    for bits in GPTQ_BITS:
        ours_out, theirs_out = work / f"qtool-gptq-{bits}", work / f"gptqmodel-{bits}"
        ours = Step(f"qtool gptq {bits}-bit g128", quantizers, "qtool",
                    ["--model", str(float_dir), "--output", str(ours_out), "--format", "gptq", "--set", f"bits={bits}",
                     *calibration], 300, facts={"tool": "qtool", "format": "gptq", "target": bits})
        theirs = Step(f"GPTQModel gptq {bits}-bit g128", quantizers, "gptqmodel",
                      ["--model", str(float_dir), "--output", str(theirs_out), "--bits", str(bits), *calibration], 300,
                      site=sites.get("gptqmodel"), needs="gptqmodel", min_s=60,
                      facts={"tool": "gptqmodel", "format": "gptq", "target": bits})
        gptq += [ours, ppl(ours, ours_out), theirs, ppl(theirs, theirs_out)]
    rest = exl2 + gptq
    if only:
        # a ppl step goes with the quantizing step before it
        keep = {id(s) for s in rest if any(word.lower() in s.row.lower() for word in only)}
        keep |= {id(rest[i + 1]) for i, s in enumerate(rest[:-1]) if id(s) in keep and rest[i + 1].stage == "ppl"}
        rest = [s for s in rest if id(s) in keep]
    return steps + rest


# ---------------------------------------------------------------- stages of this script (child side)


def stage_float(args) -> dict[str, Any]:
    """The GGUF's float weights as a float16 Hugging Face directory (rebuilt from config + state dict: a
    GGUF-loaded model cannot be saved as is), with config.json's rope_theta also at the top level, where
    ExLlamaV2 0.3.2 reads it (transformers 5 nests it). --tiny: a random tiny Llama and tokenizer instead."""
    import torch

    from qtool.checkpoints.sources import load_model, plain_model_copy

    began = time.perf_counter()
    if args.tiny:
        model, tokenizer = _tiny_model_and_tokenizer()
    else:
        loaded = load_model(args.gguf, device="cpu", dtype="float32")
        model, tokenizer = plain_model_copy(loaded.model), loaded.tokenizer
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"seconds": round(time.perf_counter() - began, 2), "parameters": sum(p.numel() for p in model.parameters()),
            "model_type": config.get("model_type"), "layers": config.get("num_hidden_layers")}


def _tiny_model_and_tokenizer():
    """A random Llama of four layers (widths multiples of 128, so g128 holds) with a byte-level tokenizer trained
    here: the plan's CPU form, for its test."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 8] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tokenizer


def stage_ppl(args) -> dict[str, Any]:
    """One output's perplexity through qtool's loader and evaluator, and its stored bits per weight (read from the
    safetensors headers: a peer's output is counted as qtool's is)."""
    from qtool.checkpoints.footprint import model_footprint
    from qtool.checkpoints.sources import load_model, read_quantization_config, resolve_source
    from qtool.data.text import load_eval_text
    from qtool.eval.perplexity import perplexity

    began = time.perf_counter()
    directory = Path(args.model)
    footprint = model_footprint(resolve_source(directory), read_quantization_config(directory))
    loaded = load_model(str(directory), device=args.device)
    result = perplexity(loaded.model, loaded.tokenizer, load_eval_text(args.text), seqlen=args.seqlen,
                        windows=args.windows, name=str(directory))
    return {"ppl": round(result.ppl, 4), "windows": result.windows, "eval_seqlen": result.seqlen,
            "bits_per_weight": None if footprint.bits_per_weight is None else round(footprint.bits_per_weight, 4),
            "stored_format": footprint.format, "size_mb": round(footprint.size_bytes / 1e6, 2),
            "seconds": round(time.perf_counter() - began, 2)}


STAGES = {"float": stage_float, "ppl": stage_ppl}


# ---------------------------------------------------------------- the plan (parent side)


def run_plan(args) -> int:
    work, data = Path(args.work), Path(args.data)
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else args.device
    sites = {name: value for name, value in (("gptqmodel", args.gptqmodel_site), ("exllamav2", args.exllamav2_site))
             if value}
    steps = plan_steps(work, data, args.gguf, args.tiny, device, sites, args.only)
    deadline = time.monotonic() + args.deadline_s
    common = {"plan": "peer-quality", "date": datetime.date.today().isoformat(), "commit": big_model.git_commit(),
              "tiny": args.tiny, "host": platform.node(), "cpus": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for step in steps:
        left = deadline - time.monotonic()
        row: dict[str, Any] = {"row": step.row, "stage": step.stage, **step.facts}
        if step.reads and not any(Path(step.reads).glob("*.safetensors")):
            row["skipped"] = f"{Path(step.reads).name} was not written"
        elif left < step.min_s:
            row["skipped"] = f"no time left ({left:.0f} s of the {args.deadline_s:.0f} s deadline)"
        elif step.stage == "exllamav2" and device == "cpu":
            row["skipped"] = "ExLlamaV2's converter needs CUDA (its extension)"
        elif step.needs and not big_model.module_available(step.needs, step.site):
            row["skipped"] = f"{step.needs} is not importable here (its wheels carried and installed?)"
        else:
            limit = min(step.limit_s, left)
            argv = [sys.executable, str(step.script), step.stage, *step.argv]
            env = {"PYTHONPATH": big_model._pythonpath(step.site), "PYTHONUNBUFFERED": "1"}
            print(f"== {step.row} (limit {limit:.0f} s, {left:.0f} s left)", flush=True)
            result = big_model.run_child(argv, limit, env, log=work / "stages.log")
            result.pop("progress", None)
            result.pop("events", None)
            row.update(result)
            row["limit_s"] = round(limit)
        row.update(common)
        rows.append(row)
        with open(out, "a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("trace", "memory")}, default=str)[:1200], flush=True)
    print(markdown_table(rows))
    return 0


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """ppl and stored bpw of every output beside the time that made it (the quantizing row before its ppl row)."""
    lines = ["| output | tool | target | stored bpw | ppl | quantize s | note |", "|---|---|---|---|---|---|---|"]
    made: dict[str, dict[str, Any]] = {r["row"]: r for r in rows if r["stage"] != "ppl"}
    for r in rows:
        if r["stage"] != "ppl":
            continue
        maker = made.get(r["row"].removeprefix("ppl of "), {})
        note = maker.get("skipped") or maker.get("error") or r.get("skipped") or r.get("error") or ""
        note = (note + (" (measurement reused)" if maker.get("measured") is False else "")).strip()
        target = r.get("target", "")
        target = f"{target:g} bpw" if r.get("format") == "exl2" else (f"{target}-bit g128" if target else "")
        bpw = r.get("bits_per_weight")
        ppl = r.get("ppl")
        lines.append(f"| {r['row'].removeprefix('ppl of ')} | {r.get('tool', '')} | {target} | "
                     f"{'' if bpw is None else f'{bpw:.3f}'} | {'' if ppl is None else f'{ppl:.2f}'} | "
                     f"{maker.get('seconds', '')} | {note[:160]} |")
    return "\n".join(lines)


def run_stage(name: str, args) -> int:
    """The child side: one result line, or an error line; the exit status says which."""
    try:
        big_model.emit("result", {**STAGES[name](args), **big_model.versions(),
                                  "own_peak_rss_bytes": big_model.own_peak_rss_bytes()})
        return 0
    except Exception as exc:  # a failing stage is a row too: the plan goes on
        import traceback

        big_model.emit("result", {"error": f"{type(exc).__name__}: {exc}"[:1500], "trace": traceback.format_exc()[-2000:]})
        return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="run the plan, each stage in its own process")
    plan.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct's GGUF (not with --tiny)")
    plan.add_argument("--data", required=True, help=f"a folder with {CALIBRATION_FILE} and {EVAL_FILE}")
    plan.add_argument("--work", required=True)
    plan.add_argument("--out", required=True, help="JSON lines, appended")
    plan.add_argument("--device", default="cuda")
    plan.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU (the plan's test)")
    plan.add_argument("--deadline-s", type=float, default=530.0)
    plan.add_argument("--only", nargs="*", default=None, help="only the steps whose row holds one of these words")
    plan.add_argument("--gptqmodel-site", default=None)
    plan.add_argument("--exllamav2-site", default=None)
    float_stage = sub.add_parser("float")
    float_stage.add_argument("--gguf", default=None)
    float_stage.add_argument("--tiny", action="store_true")
    float_stage.add_argument("--dir", required=True)
    ppl = sub.add_parser("ppl")
    ppl.add_argument("--model", required=True)
    ppl.add_argument("--text", required=True)
    ppl.add_argument("--windows", type=int, default=40)
    ppl.add_argument("--seqlen", type=int, default=2048)
    ppl.add_argument("--device", default="cuda")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "plan":
        if not args.tiny and not args.gguf:
            raise SystemExit("--gguf is required (SmolLM2-135M-Instruct's GGUF), or --tiny")
        return run_plan(args)
    return run_stage(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
