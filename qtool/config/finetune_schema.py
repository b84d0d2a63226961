"""The fine-tuning config (`qtool finetune`): a typed dataclass read from YAML/JSON/TOML (a `finetune:` section or
the whole file), overridden by CLI flags and validated with the quantization config's habits (unknown keys with a
did-you-mean, ranges, rules across fields). Rules that need the model or the machine (a quantized base, peak
memory) take what they need as arguments: this layer sits below the models."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


from qtool.config.schema import _choice, _coerce, _unknown_key, parse_config_file
from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, Level, error, raise_first_error, warning

FINETUNE_SCHEMA_VERSION = 1
FINETUNE_SECTION = "finetune"
FINETUNE_METHODS = ("lora", "qlora", "full")
LR_SCHEDULES = ("cosine", "linear", "constant")
# the compute dtype: auto is bfloat16 autocast on CUDA, float32 on the CPU
FINETUNE_DTYPES = ("auto", "float32", "bfloat16")
# the 8-bit ones come from bitsandbytes, used only when it is installed and the model is on CUDA
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
# target_modules: this word means every linear of the decoder (PEFT's spelling), never the output head
ALL_LINEAR = "all-linear"
# how LoRA's A and B start: PEFT's default (B = 0: the base's own output), or loftq (a quantized base's adapters
# start as the truncated SVD of W_float - W_quantized; needs loftq_float, the float model the base came from)
LORA_INITS = ("default", "loftq")
# the training forward: auto is qtool's fused one on CUDA where the model's layers have its form (transformers'
# elsewhere), on is the fused one wherever they do (on the CPU through its torch references), off is transformers'
FUSED_OPS = ("auto", "on", "off")


@dataclass
class FinetuneConfig:
    schema_version: int = FINETUNE_SCHEMA_VERSION
    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    use_rslora: bool = False  # scale by alpha/sqrt(rank) instead of alpha/rank
    use_dora: bool = False
    lora_init: str = "default"
    loftq_float: str = ""  # lora_init loftq: the float model (directory, .gguf, alias) the quantized base was made from
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps, whatever the epochs
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    optimizer: str = "adamw"
    batch_tokens: int = 4096  # tokens (padding included) per optimizer step
    seqlen: int = 512
    packing: bool = True
    grad_checkpointing: bool = False
    eval_every: int = 0  # steps between eval losses on the eval data; 0: only at the end
    save_every: int = 0  # steps between checkpoints; 0: none
    seed: int = 0
    dtype: str = "auto"
    fused_ops: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# the fields that change what a run computes: a checkpoint resumes only under the same values
SCHEDULE_FIELDS = ("epochs", "max_steps", "lr", "schedule", "warmup_steps", "batch_tokens", "seqlen", "packing", "seed")


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(FinetuneConfig)}


def _coerce_field(name: str, value: Any, where: str) -> Any:
    annotation = _field_types()[name]
    if annotation == "list[str]":
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise QtoolError(f"{where} must be a list of module names, got {value!r}", "e.g. [q_proj, v_proj] or all-linear")
        return list(value)
    expected = {"int": int, "float": float, "bool": bool, "str": str}[annotation]
    return _coerce(value, expected, where)


def finetune_config_from_dict(data: Any, where: str = "config") -> FinetuneConfig:
    """Build a FinetuneConfig from plain data, refusing unknown keys and wrong types (ranges: see validate)."""
    if not isinstance(data, dict):
        raise QtoolError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    version = data.get("schema_version", FINETUNE_SCHEMA_VERSION)
    if version != FINETUNE_SCHEMA_VERSION:
        raise QtoolError(f"{where}: schema_version {version!r} is not supported", f"this qtool reads schema_version {FINETUNE_SCHEMA_VERSION}")
    valid = [f.name for f in fields(FinetuneConfig)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise _unknown_key(str(key), valid, where)
        kwargs[key] = _coerce_field(key, value, f"{where}.{key}")
    return FinetuneConfig(**kwargs)


def read_finetune_config_file(path: str | Path) -> FinetuneConfig:
    """A YAML/JSON/TOML file (by suffix): its `finetune:` section when it has one, else the whole file."""
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"config file {path} does not exist", "pass a .yaml, .json or .toml file")
    data = parse_config_file(path)
    if isinstance(data, dict) and FINETUNE_SECTION in data:
        return finetune_config_from_dict(data[FINETUNE_SECTION] or {}, where=f"{path}: {FINETUNE_SECTION}")
    return finetune_config_from_dict(data, where=str(path))


def apply_finetune_overrides(config: FinetuneConfig, overrides: dict[str, Any]) -> FinetuneConfig:
    """A copy with the given fields replaced; None means "not given"."""
    valid = [f.name for f in fields(FinetuneConfig)]
    changes = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in valid:
            raise _unknown_key(key, valid, "override")
        changes[key] = _coerce_field(key, value, f"--{key.replace('_', '-')}")
    return dataclasses.replace(config, **changes)


def _at_least(name: str, value: float, low: float, fix: str) -> Finding | None:
    return None if value >= low else error(name, f"{value} is out of range", fix)


def validate_finetune_config(config: FinetuneConfig) -> list[Finding]:
    """Ranges, choices and rules across fields; the base model's kind is checked by check_method_for_base."""
    found: list[Finding | None] = [
        _choice("method", config.method, FINETUNE_METHODS),
        _choice("schedule", config.schedule, LR_SCHEDULES),
        _choice("dtype", config.dtype, FINETUNE_DTYPES),
        _choice("fused_ops", config.fused_ops, FUSED_OPS),
        _choice("optimizer", config.optimizer, OPTIMIZERS),
        _at_least("epochs", config.epochs, 1, "train at least 1 epoch (or set max_steps)"),
        _at_least("max_steps", config.max_steps, 0, "use 0 (the epochs decide) or a positive number of steps"),
        _at_least("seqlen", config.seqlen, 8, "use at least 8 tokens per sequence (512 or 2048 are usual)"),
        _at_least("warmup_steps", config.warmup_steps, 0, "use 0 or more warm-up steps"),
        _at_least("weight_decay", config.weight_decay, 0, "use 0 or a small positive value such as 0.01"),
        _at_least("max_grad_norm", config.max_grad_norm, 0, "use 0 (no clipping) or a positive norm such as 1.0"),
        _at_least("eval_every", config.eval_every, 0, "use 0 (eval at the end only) or a number of steps"),
        _at_least("save_every", config.save_every, 0, "use 0 (no checkpoints) or a number of steps"),
        _at_least("seed", config.seed, 0, "use a seed >= 0"),
    ]
    if not 0 < config.lr < 1:
        found.append(error("lr", f"{config.lr} is out of range", "use a learning rate in (0, 1): 2e-4 is usual for LoRA, 2e-5 for full"))
    if config.batch_tokens < config.seqlen:
        found.append(error("batch_tokens", f"{config.batch_tokens} is smaller than seqlen {config.seqlen}",
                           "a step holds at least one full sequence: raise --batch-tokens or lower --seqlen"))
    if config.method in ("lora", "qlora"):
        found.append(_at_least("rank", config.rank, 1, f"{config.method} needs a rank >= 1 (8 to 64 are usual)"))
        found.append(None if config.alpha > 0 else error("alpha", f"{config.alpha} is out of range", "use alpha > 0 (often 2 x rank)"))
        found.append(None if 0 <= config.dropout < 1 else error("dropout", f"{config.dropout} is out of range", "use a dropout in [0, 1)"))
        if not config.target_modules:
            found.append(error("target_modules", "is empty", f"name the linears to adapt (e.g. q_proj,v_proj) or {ALL_LINEAR}"))
    elif config.use_rslora or config.use_dora:
        flag = "use_rslora" if config.use_rslora else "use_dora"
        found.append(warning(flag, "has no effect with method full (no adapter)", "drop it, or use --method lora"))
    found.append(_choice("lora_init", config.lora_init, LORA_INITS))
    if config.lora_init == "loftq" and config.method != "qlora":
        found.append(error("lora_init", f"loftq initialises adapters from a quantized base's error, and method is {config.method}",
                           "use --method qlora on a GPTQ/EXL2 base, or --lora-init default"))
    elif config.lora_init == "loftq" and not config.loftq_float:
        found.append(error("loftq_float", "is not set, and lora_init loftq needs it",
                           "pass --loftq-float with the float model the quantized base was made from"))
    if config.warmup_steps and config.max_steps and config.warmup_steps >= config.max_steps:
        found.append(warning("warmup_steps", f"{config.warmup_steps} >= max_steps {config.max_steps}", "the learning rate never leaves its warm-up"))
    return [f for f in found if f is not None]


def check_method_for_base(config: FinetuneConfig, quantized_format: str | None) -> None:
    """Raise when the method does not suit the base: qlora needs a GPTQ/EXL2 base, lora and full a float one."""
    if config.method == "qlora" and quantized_format is None:
        raise QtoolError("method qlora needs a quantized base (GPTQ or EXL2), and this model is float",
                         "use --method lora on a float base, or quantize it first with qtool quantize")
    if config.method in ("lora", "full") and quantized_format is not None:
        raise QtoolError(f"method {config.method} trains a float base, and this model is {quantized_format}",
                         "use --method qlora on a quantized base")


def resolve_finetune_config(config_file: str | Path | None, overrides: dict[str, Any]) -> tuple[FinetuneConfig, list[Finding]]:
    """Defaults, then the file, then the flags; validated (the first error raised, naming the file when a field
    no flag set is wrong)."""
    base = read_finetune_config_file(config_file) if config_file else FinetuneConfig()
    config = apply_finetune_overrides(base, overrides)
    findings = validate_finetune_config(config)
    if config_file:
        flagged = {key for key, value in overrides.items() if value is not None}
        findings = [f if f.level is not Level.ERROR or f.where in flagged else dataclasses.replace(f, where=f"{config_file}: {f.where}")
                    for f in findings]
    return config, raise_first_error(findings)


def check_fits(needed_bytes: int, available_bytes: int, device: str, breakdown: str) -> None:
    """Raise when the estimated peak memory of the run exceeds what the device has free."""
    if needed_bytes > available_bytes:
        raise QtoolError(
            f"fine-tuning needs about {needed_bytes / 2**30:.1f} GiB more on {device} than the loaded weights ({breakdown}), "
            f"and {available_bytes / 2**30:.1f} GiB are free",
            "lower --batch-tokens or --seqlen, add --grad-checkpointing, or use --method lora/qlora instead of full",
        )
