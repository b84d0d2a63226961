"""Conversions between checkpoint formats: GPTQ -> EXL2 (a repack), EXL2 -> GPTQ (uniform bits), and GPTQ or
EXL2 -> a plain float16 model. Every conversion is checked before its output appears: the written directory is
loaded back and its logits on a fixed prompt compared with the source's (bit-equal on lossless paths)."""

from __future__ import annotations

import difflib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.core.findings import raise_first_error
from qtool.config.schema import CalibrationConfig, QuantConfig, validate_config
from qtool.checkpoints.gptq_checkpoint import load_quantized_model, save_quantized_model
from qtool.checkpoints.exl2_checkpoint import exl2_weights_of, load_exl2_model, write_exl2_checkpoint
from qtool.formats.exl2 import Exl2Weight
from qtool.convert.exl2_gptq import (
    LinearConversion,
    aligned_group_size,
    exl2_from_gptq,
    gptq_from_exl2,
    mean_code_bits,
    nearest_gptq_bits,
    relative_error,
)
from qtool.formats.gptq import GPTQ_BITS, GPTQ_TENSOR_SUFFIXES, PACK_ALIGNMENT, quantized_from_gptq_tensors
from qtool.core.output_claim import claimed_output
from qtool.core.output_dir import atomic_output_dir
from qtool.convert.format_names import SOURCE_FORMATS, TARGET_FORMATS  # torch-free, for the CLI
from qtool.core.output_marker import check_replaceable
from qtool.core.output_path import check_output_path
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.quant_linear import QuantLinear
from qtool.models.finite_outputs import non_finite_logits_error
from qtool.formats.quantized_weight import QuantizedWeight

CHECK_PROMPT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog, and 12 + 30 = 42."
CHECK_TOKENS = 32  # without a tokenizer: a fixed id sequence of this length

Progress = Callable[[int, int, str], None]

# Relative logits difference a conversion that keeps every weight exactly may show (float rounding only).
LOSSLESS_LOGITS_REL_TOL = 1e-5


@dataclass
class ConversionReport:
    source_format: str
    target_format: str
    source: str
    output: str
    lossless: bool  # every weight value kept (the logits check is then bit-equal)
    logits_max_abs_diff: float
    logits_rel_diff: float  # ||diff||_F / ||source logits||_F
    logits_dtype: str
    logits_reference: str  # what the converted model's logits were compared with
    bits_per_weight: float | None  # of the output's quantized linears (EXL2 storage bits, or GPTQ bits + scales)
    linears: list[LinearConversion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "linears"}
        data["linears"] = [linear.to_dict() for linear in self.linears]
        return data


@dataclass(frozen=True)
class Requantize:
    """gptq -> exl2 at a new bpw: the GPTQ weights are dequantized and quantized again to EXL2 with calibration."""

    bpw: float | None  # None: chosen from target_vram_gb
    calibration: str
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    head_bits: int = 0
    target_vram_gb: float = 0.0
    context_length: int = 0

    def to_config(self) -> QuantConfig:
        """The shared quantization config of this job (validated by check_request)."""
        calibration = CalibrationConfig(source=self.calibration, samples=self.samples, seqlen=self.seqlen, seed=self.seed)
        return QuantConfig(output_format="exl2", bpw=self.bpw if self.bpw is not None else QuantConfig.bpw, head_bits=self.head_bits,
                           target_vram_gb=self.target_vram_gb, context_length=self.context_length, desc_act=True, calibration=calibration)

    def describe(self) -> str:
        return f"{self.bpw} bpw" if self.bpw is not None else f"the bpw that fits {self.target_vram_gb:g} GB"


def _choice(value: str, choices: tuple[str, ...], what: str, known: tuple[str, ...] = ()) -> str:
    """value when it is one of choices or known (names with their own message later), else a did-you-mean."""
    value = value.lower()
    if value not in choices + known:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "") + f"{what} is one of {', '.join(choices)}"
        raise QtoolError(f"unknown {what} {value!r}", hint)
    return value


def detect_format(directory: Path) -> str:
    """The quantization format a checkpoint directory declares: gptq, exl2, float, or another method's name."""
    from qtool.checkpoints.sources import read_quantization_config

    config = read_quantization_config(directory)
    if not config:
        return "float"
    return str(config.get("quant_method", "gptq")).lower()


def check_request(
    source_format: str,
    target_format: str,
    source: Path,
    output: Path,
    force: bool,
    bits: int | None = None,
    group_size: int | None = None,
    requantize: Requantize | None = None,
) -> tuple[str, str]:
    """Validate a conversion before any work: formats, that SRC holds the named format, that OUT is free."""
    source_format = _choice(source_format, SOURCE_FORMATS, "source format", known=("float",))
    target_format = _choice(target_format, TARGET_FORMATS, "target format")
    if source_format == "float":
        raise QtoolError("a float model cannot be converted to a quantized format", "quantize it: qtool quantize MODEL --format gptq|exl2 ...")
    if source_format == target_format:
        raise QtoolError(f"source and target format are both {source_format}", "pick a different target format (gptq, exl2 or float)")
    if (bits is not None or group_size is not None) and (source_format, target_format) != ("exl2", "gptq"):
        raise QtoolError("--bits and --group-size apply to exl2 -> gptq only", "drop them for this conversion")
    if requantize is not None:
        flag = "--bpw" if requantize.bpw is not None else "--target-vram"
        if requantize.bpw is not None and requantize.target_vram_gb:
            raise QtoolError("--bpw and --target-vram both choose the bits per weight", "give one of them")
        if (source_format, target_format) != ("gptq", "exl2"):
            raise QtoolError(f"{flag} applies to gptq -> exl2 only", "drop it for this conversion")
        if not requantize.calibration:
            raise QtoolError(f"{flag} re-quantizes, which needs calibration text", "pass --calibration wikitext|PATH")
        raise_first_error(validate_config(requantize.to_config()))
    if not Path(source).is_dir():
        raise QtoolError(f"{source} is not a checkpoint directory", f"pass the directory of a {source_format} checkpoint")
    found = detect_format(Path(source))
    if found != source_format:
        raise QtoolError(f"{source} is a {found} checkpoint, not {source_format}", f"run qtool convert {found} {target_format} ..." if found in SOURCE_FORMATS else "pass a GPTQ or EXL2 checkpoint")
    check_replaceable(check_output_path(output, [source]), force)
    return source_format, target_format


# ---- models ----


def _load_source(source_format: str, directory: Path, dtype: torch.dtype) -> nn.Module:
    if source_format == "gptq":
        return load_quantized_model(directory, device="cpu", dtype=dtype)
    return load_exl2_model(directory, device="cpu", dtype=dtype)


def _load_output(target_format: str, directory: Path, dtype: torch.dtype) -> nn.Module:
    if target_format == "gptq":
        return load_quantized_model(directory, device="cpu", dtype=dtype)
    if target_format == "exl2":
        return load_exl2_model(directory, device="cpu", dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()


def _load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError):
        return None


def gptq_weights_of(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every QuantLinear of a loaded GPTQ model as its QuantizedWeight."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            tensors = {suffix: getattr(module, suffix) for suffix in GPTQ_TENSOR_SUFFIXES}
            weights[name] = quantized_from_gptq_tensors(tensors, module.bits, module.group_size, module.checkpoint_format, name)
    return weights


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float16) -> list[str]:
    """Replace every QuantLinear/Exl2Linear by an nn.Linear holding its weight dequantized in `dtype` (then
    stored in the model's dtype, which holds it exactly when at least as wide); return their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, (QuantLinear, Exl2Linear))]
    param_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name in names:
        module = model.get_submodule(name)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=param_dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dequantized_weight(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, linear)
    return names


def check_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """The fixed prompt's token ids (a fixed id sequence when there is no tokenizer)."""
    if tokenizer is not None:
        try:
            ids = tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"]
            if ids.numel() and int(ids.max()) < vocab_size:
                return ids
        except (TypeError, ValueError, KeyError):
            pass
    return (torch.arange(CHECK_TOKENS, dtype=torch.int64) * 7919 % vocab_size)[None]


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """The check prompt's logits in float64; NaN or infinite ones raise an error naming `name` (the source), or
    when None the converted model's: no check can pass on them."""
    logits = model(ids).logits.to(torch.float64)
    if bool(torch.isfinite(logits).all()):
        return logits
    if name is not None:
        raise non_finite_logits_error(name)
    raise QtoolError("conversion check failed: the converted model's logits hold NaN or infinite values although the source's are finite",
                     "nothing was written; report this as a qtool bug (run with --debug)")


# ---- the conversions ----


def _exl2_target(source_model: nn.Module, progress: Progress) -> tuple[dict[str, Exl2Weight], list[LinearConversion]]:
    gptq = gptq_weights_of(source_model)
    weights, reports = {}, []
    for done, (name, qw) in enumerate(gptq.items(), start=1):
        weights[name], report = exl2_from_gptq(qw, name)
        reports.append(report)
        progress(done, len(gptq), name)
    return weights, reports


def choose_gptq_target(weights: dict[str, Exl2Weight], bits: int | None, group_size: int | None) -> tuple[int, int, list[str]]:
    """(bits, group_size) of the GPTQ output and why: the model's one width when it is uniform and a GPTQ
    width, else the GPTQ width nearest its mean code width; the group size that cuts every EXL2 group."""
    notes = []
    widths = {b for w in weights.values() for b in w.group_bits}
    if bits is None:
        if len(widths) == 1 and next(iter(widths)) in GPTQ_BITS:
            bits = next(iter(widths))
        else:
            mean = mean_code_bits(weights)
            bits = nearest_gptq_bits(mean)
            lossless = min(b for b in GPTQ_BITS if b >= max(widths))
            notes.append(
                f"EXL2 widths {'/'.join(map(str, sorted(widths, reverse=True)))} (mean {mean:.2f} bits per code): GPTQ has one width, "
                f"{bits} bits chosen as the nearest; --bits {lossless} converts without loss"
            )
    elif bits not in GPTQ_BITS:
        raise QtoolError(f"--bits {bits} is not a GPTQ width", f"use one of {', '.join(map(str, GPTQ_BITS))}")
    aligned = aligned_group_size(weights)
    if group_size is None:
        group_size = aligned
    elif group_size <= 0 or aligned % group_size:
        raise QtoolError(f"--group-size {group_size} does not cut every EXL2 group into whole GPTQ groups", f"use {aligned} or a divisor of it (a multiple of 32)")
    return bits, group_size, notes


def _gptq_target(source_model: nn.Module, bits: int | None, group_size: int | None, progress: Progress) -> tuple[dict[str, QuantizedWeight], list[LinearConversion], list[str], int, int]:
    weights = exl2_weights_of(source_model)
    storable = {n: w for n, w in weights.items() if w.out_features % PACK_ALIGNMENT == 0}
    notes = [f"{n}: {w.out_features} outputs are not a multiple of {PACK_ALIGNMENT}, kept as float16" for n, w in weights.items() if n not in storable]
    if not storable:
        raise QtoolError("no EXL2 linear of this model can be stored in the GPTQ layout", f"GPTQ needs widths that are multiples of {PACK_ALIGNMENT}; convert to float instead")
    bits, group_size, why = choose_gptq_target(storable, bits, group_size)
    notes += why
    quantized, reports = {}, []
    for done, (name, w) in enumerate(storable.items(), start=1):
        quantized[name], report = gptq_from_exl2(w, bits, group_size, name)
        reports.append(report)
        progress(done, len(storable), name)
    for name, w in weights.items():
        if name not in storable:
            reports.append(LinearConversion(name, False, relative_error(w.dequantize(), w.dequantize(torch.float16)), "exl2", "float16", "kept as float16"))
    return quantized, reports, notes, bits, group_size


def _gptq_bits_per_weight(quantized: dict[str, QuantizedWeight]) -> float:
    """Codes + float16 scales + packed zeros + int32 g_idx, per weight."""
    total = count = 0
    for qw in quantized.values():
        total += qw.bits * qw.codes.numel() + qw.num_groups * qw.out_features * (16 + qw.bits) + qw.in_features * 32
        count += qw.codes.numel()
    return total / count


def _flatten_into(staging: Path, inner: Path) -> None:
    for item in inner.iterdir():
        shutil.move(str(item), str(staging / item.name))
    inner.rmdir()


def convert_checkpoint(
    source_format: str,
    target_format: str,
    source: Path | str,
    output: Path | str,
    force: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    progress: Progress | None = None,
    requantize: Requantize | None = None,
) -> ConversionReport:
    """Convert the checkpoint at `source` into `output` (atomically) and check it by logits; see the module
    docstring. bits/group_size pick the GPTQ width of an EXL2 -> GPTQ conversion (default: see
    choose_gptq_target); requantize makes gptq -> exl2 quantize again to a new bpw instead of repacking."""
    started = time.perf_counter()
    source, output = Path(source), Path(output)
    source_format, target_format = check_request(source_format, target_format, source, output, force, bits, group_size, requantize)
    progress = progress or (lambda done, total, detail="": None)
    with claimed_output(output, force, [source]) as output:
        if requantize is not None:
            return _requantized(source, output, requantize, force, progress, started)
        return _repacked(source_format, target_format, source, output, force, bits, group_size, progress, started)


def _repacked(source_format: str, target_format: str, source: Path, output: Path, force: bool, bits: int | None, group_size: int | None,
              progress: Progress, started: float) -> ConversionReport:
    """The conversions that keep the weights (or repack them to the nearest layout), written and checked by logits."""
    # Float16 output is checked in float16 (where the source's dequantized weights round exactly as stored);
    # quantized output in float32, where both sides' weights are exact. Both sides are loaded the same way in
    # that dtype (casting a loaded model would also round buffers such as rotary frequencies).
    check_dtype = torch.float16 if target_format == "float" else torch.float32
    model = _load_source(source_format, source, check_dtype)
    tokenizer = _load_tokenizer(source)
    ids = check_ids(tokenizer, model.config.vocab_size)
    reference = None if target_format == "float" else logits_of(model, ids, str(source))
    notes: list[str] = []
    with atomic_output_dir(output, force, what=f"{target_format} checkpoint converted from {source_format}") as staging:
        if target_format == "exl2":
            weights, linears = _exl2_target(model, progress)
            dequantize_linears(model)
            config = {"calibration": {"rows": None, "length": None, "dataset": f"none: converted from the GPTQ checkpoint {source.name}"}}
            write_exl2_checkpoint(staging, model, weights, config, tokenizer)
            bpw = sum(w.storage_bits() for w in weights.values()) / sum(w.in_features * w.out_features for w in weights.values())
        elif target_format == "gptq":
            quantized, linears, notes, gptq_bits, gptq_group = _gptq_target(model, bits, group_size, progress)
            notes.append(f"written as GPTQ {gptq_bits}-bit, group size {gptq_group} (act order kept through g_idx)")
            dequantize_linears(model)
            save_quantized_model(staging / "checkpoint", model, quantized, {"sym": True}, tokenizer)
            _flatten_into(staging, staging / "checkpoint")
            bpw = _gptq_bits_per_weight(quantized)
        else:
            names = dequantize_linears(model, torch.float16)
            # The reference is the source's weights as its kernels dequantize them in float16, held as nn.Linear:
            # its own forward may multiply a transposed view, which rounds differently in a float16 GEMM.
            reference = logits_of(model, ids, str(source))
            linears = [LinearConversion(name, True, 0.0, source_format, "float16") for name in names]
            progress(len(names), len(names), "")
            model.save_pretrained(str(staging))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            bpw = None
        _copy_generation_config(source, staging)
        converted = _load_output(target_format, staging, check_dtype)
        result = logits_of(converted, ids)
        lossless = all(linear.exact for linear in linears)
        diff = float((result - reference).abs().max())
        rel = float((result - reference).norm() / reference.norm()) if float(reference.norm()) else diff
        # Exact weights run through different kernels (and thread counts) may still round differently in the
        # last bits of a reduction: a lossless path must agree to float rounding, not to the bit.
        if lossless and rel > LOSSLESS_LOGITS_REL_TOL:
            raise QtoolError(
                f"conversion check failed: the weights were kept exactly but the converted model's logits differ by {diff:.3g}",
                "nothing was written; report this as a qtool bug (run with --debug)",
            )
    return ConversionReport(
        source_format=source_format,
        target_format=target_format,
        source=str(source),
        output=str(output),
        lossless=lossless,
        logits_max_abs_diff=diff,
        logits_rel_diff=rel,
        logits_dtype=str(check_dtype).removeprefix("torch."),
        logits_reference="source weights dequantized to float16" if target_format == "float" else "source model",
        bits_per_weight=bpw,
        linears=linears,
        notes=notes,
        seconds=time.perf_counter() - started,
    )


def _copy_generation_config(source: Path, staging: Path) -> None:
    """Keep the source's generation settings (writers otherwise store the defaults of the model class)."""
    path = source / "generation_config.json"
    if path.exists():
        shutil.copyfile(path, staging / path.name)


def _requantized(source: Path, output: Path, job: Requantize, force: bool, progress: Progress, started: float) -> ConversionReport:
    """gptq -> float16 (exact) in a scratch directory beside the output, then EXL2 quantization of that model;
    checked by logits against the GPTQ source (a lossy path: reported, not required to match)."""
    import tempfile

    from qtool.quant.exl2_pipeline import quantize_model_exl2

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.float-", dir=output.parent) as scratch:
        convert_checkpoint("gptq", "float", source, Path(scratch) / "float")
        _copy_generation_config(source, Path(scratch) / "float")
        # quantized into the scratch folder (this run holds the output's lock), then moved into place whole
        result = quantize_model_exl2(Path(scratch) / "float", job.to_config(), Path(scratch) / "exl2", progress=progress)
        with atomic_output_dir(output, force, what="exl2 checkpoint re-quantized from gptq") as staging:
            _flatten_into(staging, Path(scratch) / "exl2")
    model = _load_source("gptq", source, torch.float32)
    ids = check_ids(_load_tokenizer(source), model.config.vocab_size)
    reference = logits_of(model, ids, str(source))
    gptq = {name: module.dequantized_weight(torch.float32) for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    converted = load_exl2_model(output, device="cpu", dtype=torch.float32)
    result_logits = logits_of(converted, ids)
    linears = []
    for name, weight in exl2_weights_of(converted).items():
        if name in gptq:
            linears.append(LinearConversion(name, False, relative_error(gptq[name], weight.dequantize()), "gptq", f"exl2 {result.config.bpw} bpw target", "re-quantized"))
    diff = result_logits - reference
    return ConversionReport(
        source_format="gptq",
        target_format="exl2",
        source=str(source),
        output=str(output),
        lossless=False,
        logits_max_abs_diff=float(diff.abs().max()),
        logits_rel_diff=float(diff.norm() / reference.norm()) if float(reference.norm()) else float(diff.abs().max()),
        logits_dtype="float32",
        logits_reference="source model",
        bits_per_weight=result.bits_per_weight,
        linears=linears,
        notes=[f"re-quantized to {result.config.bpw} bpw ({job.describe()}) from the dequantized GPTQ weights ({job.samples} x {job.seqlen} calibration tokens of {job.calibration})"]
        + ([f"--target-vram: {result.vram_plan['summary']}"] if result.vram_plan else []),
        seconds=time.perf_counter() - started,
    )
