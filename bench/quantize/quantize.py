"""Quality and speed of `qtool quantize` on SmolLM2-135M, by the protocol of the GPTQ issue: calibrate on 128
seeded windows of 512 tokens of wiki.valid.tokens, report perplexity on the first windows of 2048 tokens of
wiki.test.raw, checkpoint size and quantization time. One JSON line per configuration.

    .venv/bin/python bench/quantize/quantize.py --grid 'w4-sym=bits=4,sym=1' 'w4-asym=bits=4,sym=0' --windows 40
    .venv/bin/python bench/quantize/quantize.py --defaults --windows 40 --qtool-eval   (what qtool ships; `qtool eval`)
    .venv/bin/python bench/quantize/quantize.py --speed [--peer-python /work/venv-peer/bin/python]
    .venv/bin/python bench/quantize/quantize.py --exl2-curve 2.5,3,3.5,4,4.5,5,6 --windows 40 [--measurement M.json]

--speed times the protocol command (`qtool quantize smollm2-135m --bits 4 --group-size 128 ...`) as a whole
process, once with an empty qtool cache (cold) and once after it (warm: the same for GGUF families that qtool
reads directly, which keep no cache), and in the same run GPTQModel's quantization of the same model with the
same calibration (bench/peers/peer_gptqmodel.py, in the venv made by bench/peers/setup_peer.sh), and prints the
ratios.

A grid entry is NAME=field=value,...; fields are QuantConfig's (bits, group_size, sym, desc_act, static_groups,
mse, refine_scales, damp_percent, method, true_sequential, checkpoint_format; output_format=exl2 with bpw and
head_bits). --exl2-curve runs EXL2 at each bpw; the first measures (unless --measurement gives an earlier
measurement.json) and the others reuse its measurement, as `qtool quantize --measurement` does. Every row reports
the bits per weight of the quantized linears as stored (codes, scales, zeros or permutations), read from the
checkpoint's safetensors headers. Perplexity is measured on the
checkpoint loaded by qtool with its linears dequantized once (float speed); --qtool-eval also runs `qtool eval`
on the checkpoint, which dequantizes on the fly.
"""

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from qtool.config.schema import CalibrationConfig, QuantConfig, check_config
from qtool.data.text import load_eval_text
from qtool.eval.perplexity import perplexity
from qtool.checkpoints.footprint import model_footprint
from qtool.quant.exl2_pipeline import quantize_model_exl2
from qtool.quant.pipeline import quantize_model
from qtool.checkpoints.sources import load_model, resolve_source

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repo
CALIBRATION = DATA / "wikitext-2" / "wiki.valid.tokens"
EVAL_TEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"


def parse_value(text: str):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def grid_entry(spec: str) -> tuple[str, QuantConfig]:
    name, _, fields = spec.partition("=")
    changes = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        changes[key] = parse_value(value)
    config = dataclasses.replace(QuantConfig(calibration=protocol_calibration()), **changes)
    if config.method == "rtn":
        config = dataclasses.replace(config, desc_act=False, static_groups=False, refine_scales=False)
    check_config(config)
    return name, config


def protocol_calibration() -> CalibrationConfig:
    return CalibrationConfig(source=str(CALIBRATION), samples=128, seqlen=512, seed=0)


def use_data_dir(data: str | None) -> None:
    """--data: where wikitext-2/wiki.valid.tokens and wikitext-2-raw/wiki.test.raw are (default ../shared/data)."""
    global CALIBRATION, EVAL_TEXT
    if data:
        CALIBRATION = Path(data) / "wikitext-2" / "wiki.valid.tokens"
        EVAL_TEXT = Path(data) / "wikitext-2-raw" / "wiki.test.raw"


def float_model_from_checkpoint(out: Path) -> torch.nn.Module:
    """The checkpoint loaded by qtool with each quantized linear turned back into a float nn.Linear once, so that
    perplexity runs at float speed (tests/ check the same weights against an independent reader of the file)."""
    from qtool.kernels.exl2_linear import Exl2Linear
    from qtool.kernels.quant_linear import QuantLinear

    model = load_model(str(out), device="cpu", dtype="float32").model
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, Exl2Linear)):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            weight = module.dequantized_weight(torch.float32) if isinstance(module, QuantLinear) else module.exl2_weight().dequantize(torch.float32)
            linear.weight.data = weight
            if module.bias is not None:
                linear.bias.data = module.bias.float()
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, linear)
    return model


def checkpoint_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def run_one(name: str, config: QuantConfig, args, text: str) -> dict:
    out = Path(args.out_dir) / name
    started = time.perf_counter()
    if config.output_format == "exl2":
        result = quantize_model_exl2(args.model, config, out, measurement=args.measurement, device=args.device, force=True)
        if args.measurement is None:  # later EXL2 entries reuse this run's measurement
            args.measurement = str(Path(args.out_dir) / "measurement.json")
            Path(args.measurement).write_bytes((out / "measurement.json").read_bytes())
    else:
        result = quantize_model(args.model, config, out, device=args.device, force=True)
    seconds = time.perf_counter() - started
    model = float_model_from_checkpoint(out).to(args.device)
    loaded = load_model(str(out), device="cpu", dtype="float32")
    ppl = perplexity(model, loaded.tokenizer, text, seqlen=2048, windows=args.windows, device=args.device).ppl
    footprint = model_footprint(resolve_source(str(out)), loaded.quantization_config)
    shown = ("calibration", "schema_version") + (("bits", "group_size", "sym", "static_groups", "mse", "checkpoint_format")
                                                 if config.output_format == "exl2" else ("output_format", "bpw", "head_bits", "target_vram_gb", "context_length"))
    row = {
        "name": name,
        "ppl": round(ppl, 4),
        "windows": args.windows,
        "bits_per_weight": round(footprint.bits_per_weight, 4) if footprint.bits_per_weight else None,
        "quantize_seconds": round(seconds, 1),
        "size_mb": round(checkpoint_bytes(out) / 1e6, 2),
        "peak_memory_gb": round(result.peak_memory_bytes / 1e9, 2),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "config": {k: v for k, v in config.to_dict().items() if k not in shown},
    }
    if config.output_format == "exl2":
        row["measured"] = result.measured
    if args.qtool_eval:
        printed = subprocess.run(
            [str(Path(sys.executable).parent / "qtool"), "eval", str(out), "--perplexity", str(EVAL_TEXT), "--windows", str(args.windows), "--json", "--device", "cpu"],
            capture_output=True, text=True, check=True,
        ).stdout
        row["qtool_eval_ppl"] = round(json.loads(printed)["ppl"], 4)
    return row


def protocol_command(out: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "qtool"), "quantize", "smollm2-135m", "--bits", "4", "--group-size", "128",
        "--calibration", str(CALIBRATION), "--samples", "128", "--seqlen", "512", "--seed", "0",
        "--output", str(out), "--force", "--json",
    ]


def timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
    import os

    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def speed(args) -> None:
    import tempfile

    rows = {}
    with tempfile.TemporaryDirectory(prefix="qtool-speed-") as tmp:
        cache = Path(tmp) / "cache"
        out = Path(tmp) / "qtool-w4"
        rows["qtool_cold_s"], _ = timed(protocol_command(out), {"QTOOL_CACHE_DIR": str(cache)})
        rows["qtool_warm_s"], printed = timed(protocol_command(out), {"QTOOL_CACHE_DIR": str(cache)})
        rows["qtool_reported_s"] = json.loads(printed)["seconds"]
        if args.peer_python:
            peer_json = Path(tmp) / "peer.json"
            peer_script = Path(__file__).resolve().parents[1] / "peers" / "peer_gptqmodel.py"
            rows["peer_process_s"], _ = timed([args.peer_python, str(peer_script), "--out", str(Path(tmp) / "peer-w4"), "--json-out", str(peer_json)])
            peer = json.loads(peer_json.read_text())
            rows["peer_quantize_run_s"] = peer["quantize_run_s"]  # GGUF export + load + quantize + save
            rows["peer_quantize_s"] = peer["quantize_s"]
            rows["peer_dtype"] = peer.get("quantize_dtype")
            rows["ratio_cold"] = round(rows["qtool_cold_s"] / rows["peer_process_s"], 3)
            rows["ratio_warm"] = round(rows["qtool_warm_s"] / rows["peer_process_s"], 3)
    rows.update({"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_threads": torch.get_num_threads(), "machine": platform.node()})
    print(json.dumps(rows, indent=2), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as handle:
            handle.write(json.dumps(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", nargs="*", default=[], help="NAME=field=value,... entries")
    parser.add_argument("--defaults", action="store_true", help="also run qtool's shipped defaults (4-bit g128)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default="/tmp/qtool-bench")
    parser.add_argument("--jsonl", default=None, help="append each result line to this file")
    parser.add_argument("--qtool-eval", action="store_true", help="also run `qtool eval` on each checkpoint")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--speed", action="store_true", help="time the protocol command (cold and warm cache) and the peer")
    parser.add_argument("--peer-python", default=None, help="python of the GPTQModel venv (bench/peers/setup_peer.sh)")
    parser.add_argument("--model", default="smollm2-135m", help="the float model (alias, directory or .gguf)")
    parser.add_argument("--data", default=None, help="folder holding wikitext-2/ and wikitext-2-raw/ (default ../shared/data)")
    parser.add_argument("--exl2-curve", default=None, help="comma-separated EXL2 bpw targets, e.g. 2.5,3,3.5,4,4.5,5,6")
    parser.add_argument("--head-bits", type=int, default=0, help="head bits of the --exl2-curve entries")
    parser.add_argument("--measurement", default=None, help="an earlier measurement.json of SmolLM2 for the EXL2 entries")
    args = parser.parse_args()
    use_data_dir(args.data)
    if args.speed:
        speed(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = [grid_entry(spec) for spec in args.grid]
    if args.defaults:
        from qtool.config.schema import QUANTIZE_DEFAULT_PRESET, read_config_file

        entries.insert(0, ("defaults", dataclasses.replace(read_config_file(QUANTIZE_DEFAULT_PRESET), calibration=protocol_calibration())))
    for bpw in filter(None, (args.exl2_curve or "").split(",")):
        head = f",head_bits={args.head_bits}" if args.head_bits else ""
        entries.append(grid_entry(f"exl2-{float(bpw):g}=output_format=exl2,desc_act=1,bpw={float(bpw)}{head}"))
    text = load_eval_text(str(EVAL_TEXT))
    print(json.dumps({"machine": platform.node(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}), flush=True)
    for name, config in entries:
        row = run_one(name, config, args, text)
        line = json.dumps(row)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
