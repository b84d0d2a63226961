"""A LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), read and checked against the
model it is meant for before peft touches it: peft reports a wrong shape as a size-mismatch traceback and a module
it does not find as a ValueError, and silently ignores tensors its config does not target. Each problem here is
one QtoolError naming the tensor or the config key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qtool.core.errors import QtoolError
from qtool.core.json_file import read_json_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the causal LM twice: its keys name modules of the LM below that
# key part after a module's name -> (which LoRA factor, the module kind it belongs to)
FACTORS = {
    "lora_A.weight": ("A", "linear"),
    "lora_B.weight": ("B", "linear"),
    "lora_embedding_A": ("A", "embedding"),
    "lora_embedding_B": ("B", "embedding"),
}
# DoRA magnitudes and LoRA biases ride on a targeted module without a shape of their own to check against r
EXTRA_SUFFIXES = ("lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_B.bias")
FIX_ADAPTER = "pass an adapter trained on this base model (PEFT's adapter_config.json + adapter_model.safetensors)"


@dataclass
class AdapterSummary:
    path: str
    rank: int
    alpha: float
    targets: list[str] = field(default_factory=list)  # module names the adapter changes
    dora: bool = False
    rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adapter_files(adapter_dir: Path) -> tuple[Path, Path]:
    """(adapter_config.json, adapter_model.safetensors) of an adapter folder; a missing one is an error."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        what = "a file" if adapter_dir.exists() else "missing"
        raise QtoolError(f"adapter {adapter_dir} is {what}, not a folder", f"pass the folder holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config.is_file():
        raise QtoolError(f"adapter {adapter_dir} has no {ADAPTER_CONFIG}", f"pass a PEFT adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    if not weights.is_file():
        if (adapter_dir / PICKLED_WEIGHTS).is_file():
            raise QtoolError(f"adapter {adapter_dir} holds only pickled weights ({PICKLED_WEIGHTS}); qtool does not unpickle",
                             "if you trust the file, save the adapter again with PeftModel.save_pretrained(DIR, safe_serialization=True)")
        raise QtoolError(f"adapter {adapter_dir} has no {ADAPTER_WEIGHTS}", f"pass a PEFT adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    return config, weights


def read_lora_config(config_path: Path) -> Any:
    """adapter_config.json as peft's LoraConfig (peft's own reading, so that its defaults apply)."""
    data = read_json_file(config_path, FIX_ADAPTER)
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise QtoolError(f"{config_path}: peft_type {data.get('peft_type')!r} is not LORA", "qtool merges LoRA adapters only")
    from peft import LoraConfig

    try:
        return LoraConfig.from_pretrained(str(config_path.parent))
    except (TypeError, ValueError, KeyError) as exc:
        raise QtoolError(f"{config_path}: peft cannot read it: {str(exc).splitlines()[0]}", "save the adapter again with the installed peft") from exc


def tensor_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors header (nothing loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), "pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise QtoolError(f"{weights_path} cannot be read as safetensors: {str(exc).splitlines()[0]}", FIX_ADAPTER) from exc


def _split_key(key: str, weights_name: str) -> tuple[str, str]:
    """(module name in the causal LM, the rest) of one adapter tensor key."""
    if not key.startswith(PEFT_PREFIX):
        raise QtoolError(f"{weights_name}: tensor {key} does not start with {PEFT_PREFIX!r}", "the file was not written by PEFT's save_pretrained")
    name = key.removeprefix(PEFT_PREFIX)
    for suffix in (*FACTORS, *EXTRA_SUFFIXES):
        if name.endswith(f".{suffix}"):
            return name.removesuffix(f".{suffix}"), suffix
    return name, ""  # a whole tensor of a module the adapter replaces (modules_to_save)


def _targeted(lora_config: Any, name: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(lora_config, name))


def _rank_of(lora_config: Any, name: str) -> int:
    """r of one module: rank_pattern's first key that the name ends with (peft's rule), else r."""
    for pattern, rank in (lora_config.rank_pattern or {}).items():
        if name == pattern or name.endswith(f".{pattern}"):
            return int(rank)
    return int(lora_config.r)


def _expected_shape(module: nn.Module, factor: str, kind: str, rank: int) -> tuple[int, int] | None:
    """The shape PEFT gives factor A or B of `module`, None when the module is not of `kind`."""
    if kind == "embedding" and isinstance(module, nn.Embedding):
        return (rank, module.num_embeddings) if factor == "A" else (module.embedding_dim, rank)
    if kind == "linear" and hasattr(module, "in_features") and hasattr(module, "out_features"):  # nn.Linear or a quantized one
        return (rank, module.in_features) if factor == "A" else (module.out_features, rank)
    return None


def check_adapter(adapter_dir: Path | str, model: nn.Module) -> AdapterSummary:
    """Read the adapter at `adapter_dir` and check that it fits `model`: its target modules exist, every tensor
    names a targeted module of the right kind, A and B have the shapes of that module and rank, and every targeted
    module has both factors. Raises a one-line QtoolError at the first mismatch."""
    config_path, weights_path = adapter_files(Path(adapter_dir))
    lora_config = read_lora_config(config_path)
    if getattr(lora_config, "target_parameters", None):
        raise QtoolError(f"{config_path}: target_parameters (LoRA on bare parameters) is not supported", "train the adapter on target_modules")
    if getattr(lora_config, "fan_in_fan_out", False):
        raise QtoolError(f"{config_path}: fan_in_fan_out is true (GPT-2 style Conv1D weights)", "qtool merges adapters of nn.Linear models; set it false")
    modules = dict(model.named_modules())
    targeted = sorted(name for name in modules if name and _targeted(lora_config, name))
    if not targeted:
        endings = sorted({name.rpartition(".")[2] for name, m in modules.items() if isinstance(m, nn.Linear) or hasattr(m, "in_features")})
        targets = lora_config.target_modules
        described = repr(targets) if isinstance(targets, str) else ", ".join(sorted(targets or ()))
        raise QtoolError(f"{config_path}: target_modules {described} match no module of the base",
                         f"the base's linear layers end in {', '.join(endings[:12])}")
    weights_name = weights_path.name
    state_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found: dict[str, set[str]] = {}
    for key, shape in sorted(tensor_shapes(weights_path).items()):
        name, suffix = _split_key(key, weights_name)
        if suffix == "":
            # modules_to_save: a whole replacement tensor of the base, e.g. lm_head.weight
            owner = name.replace(".modules_to_save.", ".").replace(".original_module.", ".")
            if owner not in state_shapes:
                raise QtoolError(f"{weights_name}: tensor {key} names no tensor of the base ({owner})", FIX_ADAPTER)
            if state_shapes[owner] != shape:
                raise QtoolError(f"{weights_name}: tensor {key} is {list(shape)} but the base's {owner} is {list(state_shapes[owner])}", FIX_ADAPTER)
            continue
        module = modules.get(name)
        if module is None:
            raise QtoolError(f"{weights_name}: tensor {key} names no module of the base ({name})", FIX_ADAPTER)
        if name not in targeted:
            raise QtoolError(f"{weights_name}: tensor {key} belongs to {name}, which {ADAPTER_CONFIG}'s target_modules do not name",
                             "the config and the weights come from different adapters")
        if suffix in FACTORS:
            factor, kind = FACTORS[suffix]
            rank = _rank_of(lora_config, name)
            expected = _expected_shape(module, factor, kind, rank)
            if expected is None:
                raise QtoolError(f"{weights_name}: tensor {key} is a {kind} factor but {name} is a {type(module).__name__}",
                                 "qtool merges LoRA on linear and embedding layers")
            if shape != expected:
                raise QtoolError(f"{weights_name}: tensor {key} is {list(shape)} but {name} with rank {rank} needs {list(expected)}", FIX_ADAPTER)
            found.setdefault(name, set()).add(factor)
        elif suffix.startswith("lora_magnitude_vector") and hasattr(module, "out_features") and shape != (module.out_features,):
            raise QtoolError(f"{weights_name}: tensor {key} is {list(shape)} but {name} has {module.out_features} outputs (DoRA magnitudes: one per output)", FIX_ADAPTER)
    for name in targeted:
        have = found.get(name, set())
        if have != {"A", "B"}:
            missing = " and ".join(sorted({"A", "B"} - have))
            raise QtoolError(f"{weights_name} has no lora_{missing} for {name}, which {ADAPTER_CONFIG} targets",
                             "the weights file is incomplete or belongs to another adapter")
    return AdapterSummary(
        path=str(adapter_dir),
        rank=int(lora_config.r),
        alpha=float(lora_config.lora_alpha),
        targets=targeted,
        dora=bool(getattr(lora_config, "use_dora", False)),
        rslora=bool(getattr(lora_config, "use_rslora", False)),
        modules_to_save=list(lora_config.modules_to_save or []),
    )
