"""`qtool finetune merge`: fold a LoRA adapter (PEFT's format) into a base model's float weights and write the
merged model as float, or quantize it again to GPTQ or EXL2 with the base's own quantization config (or a new one),
so that a fine-tuned model comes back in the format it started in.

A quantized base is dequantized first (its packed linears become float linears holding exactly the values its
kernels compute with); peft merges the adapter (`PeftModel.from_pretrained(...).merge_and_unload()`); quant/'s
public pipelines quantize the merged float model, saved to a scratch folder beside the output. What the round trip
costs is measured, never assumed: the output is loaded back with qtool's loader and its logits compared with the
merged float model's on windows of the calibration text (the fixed check prompt for a float output), and the
perplexity of both on a text when one is given."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qtool.checkpoints.sources import LoadedModel, load_model, resolve_source
from qtool.config.schema import QuantConfig
from qtool.convert.convert import check_ids, dequantize_linears
from qtool.convert.lora_adapter import AdapterSummary, adapter_files, check_adapter, read_lora_config
from qtool.convert.merge_target import merge_target
from qtool.core.errors import QtoolError
from qtool.core.output_claim import claimed_output
from qtool.core.output_dir import atomic_output_dir
from qtool.core.output_marker import check_replaceable
from qtool.core.output_path import check_output_path
from qtool.formats.registry import QUANT_FORMATS
from qtool.models.finite_outputs import non_finite_logits_error

Progress = Callable[[int, int, str], None]

# The logits check: this many windows of the calibration text, each at most this long (both models' logits are
# held at once: 2 x 256 x a 49k vocabulary in float32 is 100 MB)
CHECK_WINDOWS = 2
CHECK_SEQLEN = 256
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LogitsCheck:
    """Output logits against the merged float model's, on the same token windows."""

    max_abs_diff: float
    rel_diff: float  # ||diff||_F / ||merged float logits||_F
    top1_agreement: float  # share of positions whose argmax token is the same

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MergeReport:
    base: str
    adapter: str
    output: str
    base_format: str  # float, gptq or exl2
    output_format: str  # float (merged weights as is) or the format quantized to
    adapter_summary: AdapterSummary
    check_text: str  # what the logits were compared on
    check_tokens: int
    adapter_logits_rel_change: float  # what the adapter does: merged float vs the base, relative
    logits: LogitsCheck  # the output vs the merged float model: the cost of storing (and re-quantizing) it
    config: QuantConfig | None = None  # the quantization config of the output
    config_origin: str | None = None  # where that config came from before the flags
    bits: int | None = None  # GPTQ width of the output
    group_size: int | None = None
    bits_per_weight: float | None = None  # EXL2: of the decoder linears, as the pipeline measured
    output_dtype: str = ""  # float output: the dtype written
    ppl_merged_float: float | None = None  # with a perplexity text: before re-quantization
    ppl_output: float | None = None  # ... and of the written output
    ppl_text: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in self.__dict__.items() if key not in ("adapter_summary", "logits", "config")}
        data["adapter_summary"] = self.adapter_summary.to_dict()
        data["logits"] = self.logits.to_dict()
        data["config"] = self.config.to_dict() if self.config is not None else None
        return data


@dataclass(frozen=True)
class MergeRequest:
    """What `qtool finetune merge` is asked: the adapter folded into the base and written to output, as float when
    requantize is None, else quantized to requantize (gptq or exl2) with the base's own config or config_file,
    bits/group_size/bpw/calibration/samples/seqlen overriding it (those only with requantize); perplexity_text (a
    file or `wikitext`) adds the perplexity of the merged float model and of the output; force replaces an output
    qtool wrote."""

    base: str | Path
    adapter: str | Path
    output: str | Path
    requantize: str | None = None
    bits: int | None = None
    group_size: int | None = None
    bpw: float | None = None
    calibration: str | None = None
    samples: int | None = None
    seqlen: int | None = None
    config_file: str | Path | None = None
    perplexity_text: str | Path | None = None
    force: bool = False


@dataclass(frozen=True)
class MergePlan:
    """A request checked before any model is loaded."""

    base: Path
    adapter: Path
    output: Path
    base_format: str
    requantize: str | None
    config: QuantConfig | None
    config_origin: str | None
    inputs: tuple[Path, ...]  # files and folders the run reads (the output may be none of them, nor hold one)
    flags: tuple[str, ...] = ()  # the flags that changed the starting config


def _base_format(base: str | Path) -> tuple[str, dict[str, Any] | None, Path | None]:
    """(format, quantization_config, the folder or file read) of the base model."""
    source = resolve_source(base)
    quantization = source.quantization_config
    read = source.path / source.gguf_file if source.gguf_file else source.path
    if not quantization:
        return "float", None, read
    method = str(quantization.get("quant_method", "gptq")).lower()
    if method not in QUANT_FORMATS:
        raise QtoolError(f"base {base} is quantized with {method!r}", f"qtool merges into float, {' and '.join(QUANT_FORMATS)} bases")
    return method, quantization, read


def plan_merge(request: MergeRequest) -> MergePlan:
    """Check everything that can be checked without loading a model: the base's format, the adapter's files and
    config, the target config (validated), that the output is free. Raises a one-line QtoolError."""
    r = request
    base, adapter_dir, output, requantize = r.base, r.adapter, r.output, r.requantize
    base_format, quantization, read = _base_format(base)
    config_path, _ = adapter_files(Path(adapter_dir))
    read_lora_config(config_path)
    skeleton = model_skeleton(Path(base))
    if skeleton is not None:
        check_adapter(adapter_dir, skeleton)  # a mismatched adapter fails before the weights are read
    quant_flags = {"--bits": r.bits, "--group-size": r.group_size, "--bpw": r.bpw, "--calibration": r.calibration, "--samples": r.samples,
                   "--seqlen": r.seqlen, "--config": r.config_file}
    config = origin = None
    if requantize is None:
        given = next((flag for flag, value in quant_flags.items() if value is not None), None)
        if given is not None:
            raise QtoolError(f"{given} applies with --requantize only", "add --requantize gptq|exl2 to quantize the merged model, or drop it")
    else:
        overrides = {"bits": r.bits, "group_size": r.group_size, "bpw": r.bpw, "calibration_source": r.calibration,
                     "calibration_samples": r.samples, "calibration_seqlen": r.seqlen}
        target = merge_target(requantize.lower(), base_format, quantization, str(base), r.config_file, overrides)
        config, origin = target.config, target.origin
    if r.perplexity_text is not None and str(r.perplexity_text) != "wikitext" and not Path(r.perplexity_text).is_file():
        raise QtoolError(f"--perplexity {r.perplexity_text}: no such file", "pass a text file, or `wikitext`")
    inputs = [p for p in (read, Path(adapter_dir)) if p is not None]
    for extra in (config.calibration.source if config is not None else None, r.perplexity_text, r.config_file):
        if extra is not None and Path(extra).exists():
            inputs.append(Path(extra))
    output = check_output_path(output, inputs)
    check_replaceable(output, r.force)
    flags = tuple(flag for flag, value in quant_flags.items() if value is not None and flag != "--config")
    return MergePlan(Path(base), Path(adapter_dir), output, base_format, requantize.lower() if requantize else None, config, origin, tuple(inputs), flags)


# ---- models ----


def model_skeleton(base: Path) -> nn.Module | None:
    """The base's module tree on the meta device (shapes, no weights) from its config.json, without its
    quantization_config: the quantized linears' float shapes. None when the base is not such a folder."""
    if not (base.is_dir() and (base / "config.json").is_file()):
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, TypeError, RuntimeError):
        return None  # the loader says what is wrong with the base, in its own words


def load_float_base(base: Path) -> LoadedModel:
    """The base model in float32 on the CPU; a GPTQ or EXL2 base with its quantized linears dequantized (exactly:
    float32 holds every value the kernels compute with)."""
    loaded = load_model(base, device="cpu", dtype="float32")
    dequantize_linears(loaded.model, torch.float32)
    return loaded


def apply_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """The model with the adapter folded into its weights (peft's merge; NaN in a merged weight is an error)."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        return wrapped.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge: a merged weight holds NaN or infinite values
        raise QtoolError(f"merging adapter {adapter_dir} failed: {str(exc).splitlines()[0]}", "check the adapter's weights are finite") from exc


def check_windows(tokenizer: Any, vocab_size: int, config: QuantConfig | None, context: int | None) -> tuple[torch.Tensor, str]:
    """The token windows the logits are compared on, and what they are: CHECK_WINDOWS windows from the start of the
    calibration text (re-quantized output), else the fixed check prompt."""
    if config is None or tokenizer is None:
        ids = check_ids(tokenizer, vocab_size)
        return ids, f"the fixed check prompt ({ids.shape[1]} tokens)"
    from qtool.data.text import load_calibration_text, tokenize_text
    from qtool.eval.perplexity import cut_windows

    seqlen = min(config.calibration.seqlen, CHECK_SEQLEN, context or CHECK_SEQLEN)
    ids = tokenize_text(tokenizer, load_calibration_text(config.calibration.source))
    windows = cut_windows(ids, seqlen)[:CHECK_WINDOWS]
    return windows, f"{windows.shape[0]} windows of {seqlen} tokens from the start of the calibration text {config.calibration.source}"


@torch.no_grad()
def window_logits(model: nn.Module, windows: torch.Tensor, name: str) -> torch.Tensor:
    """float32 logits [n, T, vocab] of each window on its own; NaN or infinite ones raise naming `name`."""
    logits = torch.stack([model(window[None]).logits[0].float() for window in windows])
    if not bool(torch.isfinite(logits).all()):
        raise non_finite_logits_error(name)
    return logits


def compare_logits(result: torch.Tensor, reference: torch.Tensor) -> LogitsCheck:
    diff = result.double() - reference.double()
    norm = float(reference.double().norm())
    return LogitsCheck(
        max_abs_diff=float(diff.abs().max()),
        rel_diff=float(diff.norm()) / norm if norm else float(diff.abs().max()),
        top1_agreement=float((result.argmax(-1) == reference.argmax(-1)).double().mean()),
    )


def _perplexity(model: nn.Module, tokenizer: Any, text: str | None) -> float | None:
    if text is None:
        return None
    from qtool.eval.perplexity import perplexity

    return perplexity(model, tokenizer, text).ppl


def _float_output_dtype(base: Path, base_format: str) -> torch.dtype:
    """A float base keeps its stored dtype; a quantized one (its values need no more) becomes float16."""
    if base_format != "float" or not (base / "config.json").is_file():
        return torch.float16
    from qtool.core.json_file import read_json_file

    config = read_json_file(base / "config.json", "restore the base's config.json")
    return FLOAT_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)


def _copy_generation_config(base: Path, directory: Path) -> None:
    path = base / "generation_config.json"
    if base.is_dir() and path.is_file():
        shutil.copyfile(path, directory / path.name)


def save_float_model(directory: Path, model: nn.Module, tokenizer: Any, dtype: torch.dtype) -> None:
    """The merged model as a plain Hugging Face directory in `dtype` (its tokenizer beside it)."""
    model = model.to(dtype)
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise QtoolError(f"merged tensor {name} overflows {str(dtype).removeprefix('torch.')}", "its values exceed the dtype's range: merge into a float32 base")
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _quantize(scratch: Path, config: QuantConfig, output: Path, device: str, progress: Progress) -> tuple[Any, float | None]:
    """Quantize the float model in `scratch` with quant/'s pipeline for config.output_format into `output`."""
    if config.output_format == "exl2":
        from qtool.quant.exl2_pipeline import quantize_model_exl2

        result = quantize_model_exl2(scratch, config, output, device=device, progress=progress)
        return result, result.bits_per_weight
    from qtool.quant.pipeline import quantize_model

    return quantize_model(scratch, config, output, device=device, progress=progress), None


def _flatten_into(staging: Path, inner: Path) -> None:
    for item in inner.iterdir():
        shutil.move(str(item), str(staging / item.name))


# ---- the job ----


def merge_adapter(request: MergeRequest, device: str = "auto", progress: Progress | None = None) -> MergeReport:
    """Do `request` (see MergeRequest), writing its output atomically; the quantization config is merge_target's
    (the base's own when it has that format). `device` is where the quantization runs; merging and checks run on
    the CPU."""
    started = time.perf_counter()
    plan = plan_merge(request)
    force, perplexity_text = request.force, request.perplexity_text
    report = progress or (lambda done, total, detail="": None)
    with claimed_output(plan.output, force, plan.inputs) as output:
        report(0, 3, "loading the base")
        loaded = load_float_base(plan.base)
        model, tokenizer = loaded.model, loaded.tokenizer
        summary = check_adapter(plan.adapter, model)
        if tokenizer is None and (plan.requantize or perplexity_text is not None):
            raise QtoolError(f"base {plan.base} has no tokenizer", "re-quantizing and --perplexity tokenize text: add the tokenizer files to the base")
        ppl_text = None
        if perplexity_text is not None:
            from qtool.data.text import load_eval_text

            ppl_text = load_eval_text(perplexity_text)
        windows, check_text = check_windows(tokenizer, model.config.vocab_size, plan.config, getattr(model.config, "max_position_embeddings", None))
        base_logits = window_logits(model, windows, str(plan.base))
        report(1, 3, "merging the adapter")
        model = apply_adapter(model, plan.adapter)
        merged_logits = window_logits(model, windows, f"{plan.base} merged with {plan.adapter}")
        adapter_change = compare_logits(merged_logits, base_logits).rel_diff
        del base_logits
        ppl_merged = _perplexity(model, tokenizer, ppl_text)
        if plan.requantize is None:
            return _write_float(plan, output, force, model, tokenizer, summary, windows, check_text, merged_logits, adapter_change,
                                ppl_merged, perplexity_text, ppl_text, report, started)
        return _write_requantized(plan, output, force, model, tokenizer, summary, windows, check_text, merged_logits, adapter_change,
                                  ppl_merged, perplexity_text, ppl_text, device, report, started)


def _write_float(plan: MergePlan, output: Path, force: bool, model: nn.Module, tokenizer: Any, summary: AdapterSummary, windows: torch.Tensor,
                 check_text: str, merged_logits: torch.Tensor, adapter_change: float, ppl_merged: float | None, perplexity_text: Any,
                 ppl_text: str | None, report: Progress, started: float) -> MergeReport:
    dtype = _float_output_dtype(plan.base, plan.base_format)
    notes = []
    if plan.base_format != "float":
        notes.append(f"written as float16; --requantize {plan.base_format} quantizes it again with the base's config")
    with atomic_output_dir(output, force, what=f"float model merged with the adapter {plan.adapter.name}") as staging:
        report(2, 3, "writing the merged model")
        save_float_model(staging, model, tokenizer, dtype)
        _copy_generation_config(plan.base, staging)
        del model
        written = load_model(staging, device="cpu", dtype="float32").model
        check = compare_logits(window_logits(written, windows, str(output)), merged_logits)
        ppl_output = _perplexity(written, tokenizer, ppl_text)
    report(3, 3, "")
    return MergeReport(
        base=str(plan.base), adapter=str(plan.adapter), output=str(output), base_format=plan.base_format, output_format="float",
        adapter_summary=summary, check_text=check_text, check_tokens=windows.numel(), adapter_logits_rel_change=adapter_change, logits=check,
        output_dtype=str(dtype).removeprefix("torch."), ppl_merged_float=ppl_merged, ppl_output=ppl_output,
        ppl_text=str(perplexity_text) if perplexity_text is not None else None, notes=notes, seconds=time.perf_counter() - started,
    )


def _write_requantized(plan: MergePlan, output: Path, force: bool, model: nn.Module, tokenizer: Any, summary: AdapterSummary,
                       windows: torch.Tensor, check_text: str, merged_logits: torch.Tensor, adapter_change: float, ppl_merged: float | None,
                       perplexity_text: Any, ppl_text: str | None, device: str, report: Progress, started: float) -> MergeReport:
    config = plan.config
    assert config is not None  # plan_merge resolves it whenever requantize is given
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.merged-", dir=output.parent) as scratch:
        merged_dir, quantized_dir = Path(scratch) / "merged-float", Path(scratch) / "quantized"
        # float32: the merged weights exactly as peft computed them are what the quantizer sees
        save_float_model(merged_dir, model, tokenizer, torch.float32)
        _copy_generation_config(plan.base, merged_dir)
        del model
        result, measured_bpw = _quantize(merged_dir, config, quantized_dir, device, report)
        with atomic_output_dir(output, force, what=f"{config.output_format} checkpoint of {plan.base.name} merged with the adapter {plan.adapter.name}") as staging:
            _flatten_into(staging, quantized_dir)
            written = load_model(staging, device="cpu", dtype="float32").model
            check = compare_logits(window_logits(written, windows, str(output)), merged_logits)
            ppl_output = _perplexity(written, tokenizer, ppl_text)
    notes = [f"quantization config: {plan.config_origin}" + (f", then {', '.join(plan.flags)}" if plan.flags else "")]
    if result.skipped_linears:
        notes.append(f"{len(result.skipped_linears)} linears kept float16 (the format cannot hold them): {', '.join(sorted(result.skipped_linears)[:3])}")
    gptq = config.output_format == "gptq"
    return MergeReport(
        base=str(plan.base), adapter=str(plan.adapter), output=str(output), base_format=plan.base_format, output_format=config.output_format,
        adapter_summary=summary, check_text=check_text, check_tokens=windows.numel(), adapter_logits_rel_change=adapter_change, logits=check,
        config=result.config, config_origin=plan.config_origin, bits=config.bits if gptq else None, group_size=config.group_size if gptq else None,
        bits_per_weight=measured_bpw, ppl_merged_float=ppl_merged, ppl_output=ppl_output,
        ppl_text=str(perplexity_text) if perplexity_text is not None else None, notes=notes, seconds=time.perf_counter() - started,
    )
