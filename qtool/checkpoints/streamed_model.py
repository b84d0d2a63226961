"""A float model whose weights stay in their files until a part of it is needed: the transformers model is built
from the config with its parameters on the meta device (buffers such as rotary tables are computed as usual),
and the tensors under a name prefix are read one by one from the (sharded) safetensors or the GGUF file when
`materialize` is called, and dropped again by `release`. Quantizing layer by layer then holds one decoder layer
in host memory, not the model.

The values are those `load_model` gives (float32, GGUF tensors dequantized and q/k rows in transformers' order):
streaming changes how much is in memory at once, not what is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qtool.checkpoints.expected_tensors import missing_tensor_names, missing_tensors_error, tied_weight_pairs
from qtool.checkpoints.weight_init import skipped_weight_init
from qtool.core.errors import QtoolError
from qtool.core.findings import has_errors


@dataclass
class StreamedModel:
    """The model (parameters on meta until materialized) and how to read any of its tensors."""

    model: nn.Module
    read: Callable[[str], torch.Tensor]  # a stored tensor by its name in the model's state dict, as float32
    names: frozenset[str]  # the tensors the files hold
    describe: str  # the files, for log lines
    resident: set[str] = field(default_factory=set)  # the parameters read in and not released

    def float_tensor(self, name: str) -> torch.Tensor:
        """A tensor of the model's state dict: its value in memory, else read from the files (a released layer's
        norm, a linear kept float); the tied copy of a tensor the files hold once is read as that tensor."""
        tensor = self.model.state_dict()[name]
        if tensor.device.type != "meta":
            return tensor
        if name not in self.names:
            name = tied_weight_pairs(self.model).get(name, name)
        return self.read(name)

    def unread(self, prefix: str = "", exclude: str | None = None) -> list[str]:
        """The parameters whose name starts with `prefix` (and not with `exclude`) that are still on meta."""
        return [name for name, p in self.model.named_parameters(remove_duplicate=False)
                if name.startswith(prefix) and not (exclude and name.startswith(exclude)) and p.device.type == "meta"]

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of `names` the files hold, read (no change to the model: safe from another thread)."""
        return {name: self.read(name) for name in names if name in self.names}

    def materialize(self, prefix: str = "", exclude: str | None = None,
                    already_read: dict[str, torch.Tensor] | None = None) -> None:
        """Read every parameter whose name starts with `prefix` (and not with `exclude`) that is still on meta;
        those in `already_read` (read_tensors' result, e.g. from a read-ahead) are taken from there."""
        wanted = self.unread(prefix, exclude)
        tied = tied_weight_pairs(self.model)
        already_read = already_read or {}
        state = {name: already_read[name] if name in already_read else self.read(name) for name in wanted if name in self.names}
        self.model.load_state_dict(state, strict=False, assign=True)
        self.resident.update(state)
        if any(name in tied for name in wanted if name not in self.names):
            self.model.tie_weights()  # the head of tied embeddings shares the embedding just read

    def release(self, prefix: str) -> None:
        """Put the parameters under `prefix` back on the meta device, freeing their memory."""
        for module_name, module in self.model.named_modules():
            for key, parameter in list(module._parameters.items()):
                name = f"{module_name}.{key}" if module_name else key
                if parameter is not None and name.startswith(prefix) and parameter.device.type != "meta":
                    module._parameters[key] = nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad)
                    self.resident.discard(name)


@dataclass(frozen=True)
class NotStreamable:
    """Why a source's files cannot be read tensor by tensor as they are (a layout or naming only transformers'
    loader handles, a damaged file, a config transformers cannot build): the whole-model loader reads them, or
    names what is wrong with them."""

    reason: str


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _skeleton(config: Any) -> nn.Module:
    """The causal LM of `config`, float32, parameters on meta and buffers computed (accelerate's empty-weights
    context, which puts parameters only on meta), weights not initialised."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False), skipped_weight_init():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _check_names(model: nn.Module, stored: set[str]) -> NotStreamable | None:
    """None when the files name exactly the model's tensors (tied copies may be absent): then they can be read one
    by one. Files in an older naming (transformers renames on load) or for another layout go through from_pretrained;
    files that lack a tensor too, whose loader refuses them in the words validate, eval and run use."""
    missing = missing_tensor_names(model, stored)
    if missing is None:
        return NotStreamable(f"its files name tensors {type(model).__name__} has no place for (an older naming?)")
    problem = missing_tensors_error(type(model).__name__, missing)
    return None if problem is None else NotStreamable(problem.message)


def _check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], describe: str) -> None:
    for name, tensor in model.state_dict().items():
        if name in shapes and tuple(tensor.shape) != tuple(shapes[name]):
            raise QtoolError(f"{describe}: {name} is stored as {list(shapes[name])} but config.json makes it {list(tensor.shape)}",
                             "the config.json does not match the weights")


class _SafetensorsFiles:
    """A checkpoint's safetensors files, each tensor read from the file the index names. The file is opened for
    each read and closed after it: an open handle keeps its memory map, and the pages it has read would count in
    the process's resident memory until the end (a header parse per tensor costs far less than its read)."""

    def __init__(self, directory: Path, where: dict[str, str]):
        self.directory, self.where = directory, where

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.directory / self.where[name]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name).to(torch.float32)


def open_streamed_safetensors(directory: Path) -> StreamedModel | NotStreamable:
    """A StreamedModel of a float Hugging Face directory with safetensors weights, or why its files cannot be read
    tensor by tensor as they are (no safetensors or damaged headers, names transformers would rename or a tensor
    missing, a config it cannot build). Tensors whose shapes the config contradicts raise a QtoolError."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, GenerationConfig

    from qtool.checkpoints.float_model_files import check_before_loading
    from qtool.formats.safetensors_header import read_checkpoint_headers

    headers, _, findings = read_checkpoint_headers(directory)
    if not headers:
        return NotStreamable("it has no safetensors weights")
    if has_errors(findings):
        return NotStreamable("its safetensors headers cannot be read")  # the whole-model loader names the file and fault
    check_before_loading(directory)  # undeclared quantized tensors, config sizes against stored shapes
    try:
        config = AutoConfig.from_pretrained(str(directory))
        model = _skeleton(config)
    # a config.json transformers refuses (a field of the wrong type, an unknown model_type...) or a model class
    # that fails in its own way on it: from_pretrained, in the whole-model loader, reports it
    except (ValueError, KeyError, OSError, TypeError, AttributeError, RuntimeError, StrictDataclassError) as exc:
        return NotStreamable(f"transformers cannot build a model from its config ({_first_line(exc)})")
    describe = f"{directory}"
    unmatched = _check_names(model, set(headers))
    if unmatched is not None:
        return unmatched
    _check_shapes(model, {name: header.shape for name, header in headers.items()}, describe)
    try:  # from_pretrained reads the generation config the directory ships, else keeps the one the config implies
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    except OSError:
        pass
    files = _SafetensorsFiles(directory, {name: header.file for name, header in headers.items()})
    return StreamedModel(model, files.read, frozenset(headers), describe)


def open_streamed_gguf(path: Path) -> StreamedModel | NotStreamable:
    """A StreamedModel of a GGUF file whose layout qtool's table maps (qtool.checkpoints.gguf_loader), each tensor
    dequantized when read, or why not: a file load_model reads through transformers, or a damaged one."""
    from gguf.constants import GGMLQuantizationType
    from transformers import AutoConfig

    from qtool.checkpoints.gguf_file import GgufFormatError
    from qtool.checkpoints.gguf_loader import dequantized_tensor, read_gguf_layout

    try:
        layout = read_gguf_layout(path)
    except (GgufFormatError, OSError) as exc:
        return NotStreamable(f"its header cannot be read ({_first_line(exc)})")
    if layout is None:
        return NotStreamable("qtool's GGUF table does not map its layout (the log says which part): transformers reads it")
    # a type gguf-py cannot dequantize would fail in the middle of the run: try one row of each type now
    for ggml_type in {tensor.ggml_type for tensor in layout.tensors.values()}:
        tensor = next(t for t in layout.header.tensors if t.ggml_type == ggml_type)
        try:
            from gguf.quants import dequantize

            rows = layout.header.tensor_bytes(tensor).reshape(-1, layout.header.tensor_bytes(tensor).shape[-1])
            dequantize(rows[:1], GGMLQuantizationType(ggml_type))
        except NotImplementedError:
            return NotStreamable(f"gguf-py cannot dequantize its {GGMLQuantizationType(ggml_type).name} tensors: transformers reads it")
    config = AutoConfig.for_model(layout.family.model_type, **layout.fields)
    model = _skeleton(config)
    describe = f"{path}"
    unmatched = _check_names(model, set(layout.tensors))
    if unmatched is not None:
        return unmatched
    _check_shapes(model, {name: tensor.shape for name, tensor in layout.tensors.items()}, describe)
    return StreamedModel(model, lambda name: dequantized_tensor(layout, name), frozenset(layout.tensors), describe)
