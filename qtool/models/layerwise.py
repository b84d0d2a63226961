"""Running a causal LM one decoder layer at a time, as GPTQ needs (the inputs of layer i come from layers 0..i-1):
capture what every layer receives, run a layer over all samples, and finish with the final norm and head."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.models.architectures import ArchitectureSpec, decoder_layers, get_architecture, get_module


@dataclass(frozen=True)
class LayerCall:
    """What one decoder layer receives besides its hidden states, for one sample."""

    args: tuple  # positional arguments after hidden_states (usually none)
    kwargs: dict  # attention_mask, position_embeddings (cos, sin), position_ids, use_cache, ...


@dataclass(frozen=True)
class LayerInputs:
    """The inputs of decoder layer `layer_index` for every sample. `calls[sample][layer]` is shared by all
    LayerInputs of one capture: only the hidden states change from layer to layer."""

    layer_index: int
    hidden_states: tuple[torch.Tensor, ...]
    calls: tuple[tuple[LayerCall | None, ...], ...]

    def __len__(self) -> int:
        return len(self.hidden_states)

    def call(self, sample_index: int) -> LayerCall:
        call = self.calls[sample_index][self.layer_index]
        if call is None:
            raise QtoolError(
                f"the capture forward never reached decoder layer {self.layer_index}",
                hint="the model's forward runs fewer layers than its layer list holds (config.num_hidden_layers)",
            )
        return call

    def advanced(self, hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> LayerInputs:
        """The next layer's inputs: these hidden states with the same per-layer arguments."""
        if len(hidden_states) != len(self):
            raise ValueError(f"expected {len(self)} hidden-state tensors, got {len(hidden_states)}")
        return replace(self, layer_index=self.layer_index + 1, hidden_states=tuple(hidden_states))


def subset_inputs(inputs: LayerInputs, samples: list[int]) -> LayerInputs:
    """The inputs of the given samples only (in that order), e.g. one process's share of the calibration set."""
    return LayerInputs(inputs.layer_index, tuple(inputs.hidden_states[i] for i in samples), tuple(inputs.calls[i] for i in samples))


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


class _LayerInputRecorder(nn.Module):
    """Stands in for one decoder layer during capture: records its arguments and passes hidden states through,
    so no layer computes anything. Attribute reads fall through to the real layer (some forwards read e.g.
    `decoder_layer.attention_type`)."""

    def __init__(self, layer: nn.Module, index: int, records: dict, is_last: bool):
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)  # not registered: the recorder owns no parameters
        object.__setattr__(self, "_records", records)
        self.index = index
        self.is_last = is_last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self._records[self.index] = (hidden, rest, kwargs)
        if self.is_last:
            raise _StopForward
        return hidden


class _TensorPool:
    """Stores tensors on one device, sharing one copy among equal tensors (the masks, rotary tables and position
    ids of samples with equal lengths), so captured arguments cost memory once per distinct value."""

    def __init__(self, device: torch.device):
        self.device = device
        self._by_key: dict[tuple, list[torch.Tensor]] = {}
        self._by_id: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (source kept alive, stored)

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        known = self._by_id.get(id(tensor))
        if known is not None and known[0] is tensor:
            return known[1]
        moved = tensor.detach().to(self.device)
        bucket = self._by_key.setdefault((tuple(moved.shape), moved.dtype), [])
        stored = next((t for t in bucket if torch.equal(t, moved)), None)
        if stored is None:
            bucket.append(moved)
            stored = moved
        self._by_id[id(tensor)] = (tensor, stored)
        return stored

    def forget_sources(self) -> None:
        self._by_id.clear()


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _as_samples(input_ids: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """One [batch, seq] tensor per forward: a 2-D tensor gives one sample per row, a 1-D tensor one sample, and a
    list element is one sample (1-D) or one batch (2-D)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            return [input_ids.unsqueeze(0)]
        if input_ids.dim() == 2:
            return [row.unsqueeze(0) for row in input_ids]
        raise QtoolError(f"input_ids has shape {tuple(input_ids.shape)}", hint="pass [seq] or [samples, seq] token ids")
    samples = []
    for i, ids in enumerate(input_ids):
        if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.numel() == 0:
            raise QtoolError(f"input_ids[{i}] is not a non-empty 1-D or 2-D tensor", hint="pass token id tensors")
        samples.append(ids.unsqueeze(0) if ids.dim() == 1 else ids)
    if not samples:
        raise QtoolError("no input_ids samples given", hint="pass at least one tensor of token ids")
    return samples


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _stored_call(record: tuple | None, pool: _TensorPool) -> LayerCall | None:
    if record is None:  # the forward stopped before this layer
        return None
    _, args, kwargs = record
    return LayerCall(args=_map_tensors(args, pool.store), kwargs=_map_tensors(kwargs, pool.store))


def capture_layer_inputs(
    model: nn.Module,
    input_ids: list[torch.Tensor] | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    storage_device: torch.device | str = "cpu",
    spec: ArchitectureSpec | None = None,
) -> LayerInputs:
    """Run the model's own forward on each sample up to the decoder layers and record what every layer receives.

    Layer arguments are captured per layer because they differ by layer type (sliding-window masks, Gemma 3's
    local/global rotary tables). To get them without computing any layer, the decoder-layer list is swapped for
    recorders for the duration of the capture and restored afterwards; only the modules outside the layers
    (embeddings, rotary embedding) run, on `device` (default: the embeddings' device). Results are kept on
    `storage_device`.
    """
    spec = spec or get_architecture(model)
    layers = decoder_layers(model, spec)
    parent_path, _, attribute = spec.layers_path.rpartition(".")
    parent = get_module(model, parent_path)
    if device is None:
        device = get_module(model, spec.embed_path).weight.device if spec.embed_path else _module_device(model)
    pool = _TensorPool(torch.device(storage_device))
    records: dict[int, tuple] = {}
    recorders = nn.ModuleList(
        _LayerInputRecorder(layer, index, records, index == len(layers) - 1) for index, layer in enumerate(layers)
    )
    hidden_states: list[torch.Tensor] = []
    calls: list[tuple[LayerCall | None, ...]] = []
    setattr(parent, attribute, recorders)
    try:
        with torch.no_grad():
            for ids in _as_samples(input_ids):
                records.clear()
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                if 0 not in records:
                    raise QtoolError(
                        f"the forward of {type(model).__name__} never reached decoder layer 0",
                        hint=f"'{spec.layers_path}' must be the list the model's forward iterates",
                    )
                hidden_states.append(records[0][0].detach().to(pool.device))
                calls.append(tuple(_stored_call(records.get(i), pool) for i in range(len(layers))))
                pool.forget_sources()
    finally:
        setattr(parent, attribute, layers)
        records.clear()
    return LayerInputs(layer_index=0, hidden_states=tuple(hidden_states), calls=tuple(calls))


# Samples that share their layer arguments run through a layer together, up to this many tokens per call: fewer,
# larger matmuls and a fraction of the per-call Python work (measured on SmolLM2 on a 2-core CPU).
BATCH_TOKENS = 4096


def _call_key(call: LayerCall) -> str:
    """Equal for calls whose arguments are the same objects (the capture shares equal tensors between samples)."""
    return repr(_map_tensors((call.args, call.kwargs), lambda t: ("tensor", id(t))))


def sample_batches(inputs: LayerInputs, max_tokens: int = BATCH_TOKENS) -> list[tuple[int, ...]]:
    """Consecutive samples grouped into batches that can run as one call: the same layer arguments (hence the same
    length) and at most max_tokens tokens (a longer sample runs alone)."""
    batches: list[tuple[int, ...]] = []
    current: list[int] = []
    key, tokens = None, 0
    for index, hidden in enumerate(inputs.hidden_states):
        sample_key, count = _call_key(inputs.call(index)), hidden.shape[0] * hidden.shape[1]
        if current and (sample_key != key or tokens + count > max_tokens):
            batches.append(tuple(current))
            current, tokens = [], 0
        current.append(index)
        key, tokens = sample_key, tokens + count
    if current:
        batches.append(tuple(current))
    return batches


def run_layer_batch(layer: nn.Module, inputs: LayerInputs, samples: tuple[int, ...], *, device: torch.device | str | None = None,
                    moved: dict | None = None, grad: bool = False) -> torch.Tensor:
    """Output hidden states of `layer` for the samples of one batch of sample_batches, concatenated along the batch
    dimension. `moved` (one dict per pass) keeps shared arguments moved to the device once. With `grad` the call
    is recorded for autograd (hidden states that require grad can be differentiated through it)."""
    device = torch.device(device) if device is not None else _module_device(layer)
    moved = {} if moved is None else moved
    call = inputs.call(samples[0])

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        known = moved.get(id(tensor))
        if known is None or known[0] is not tensor:
            known = (tensor, tensor.to(device))
            moved[id(tensor)] = known
        return known[1]

    parts = [inputs.hidden_states[i].to(device) for i in samples]
    hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
    with torch.set_grad_enabled(grad):
        output = layer(hidden, *_map_tensors(call.args, to_device), **_map_tensors(call.kwargs, to_device))
    return output[0] if isinstance(output, (tuple, list)) else output


def split_batch(output: torch.Tensor, inputs: LayerInputs, samples: tuple[int, ...]) -> list[torch.Tensor]:
    """One tensor per sample (its own storage) from a batch's output."""
    if len(samples) == 1:
        return [output]
    sizes = [inputs.hidden_states[i].shape[0] for i in samples]
    return [piece.clone() for piece in output.split(sizes)]


def run_layer(
    layer: nn.Module, layer_inputs: LayerInputs, sample_index: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Output hidden states of `layer` (decoder layer `layer_inputs.layer_index`) for one sample, on `device`
    (default: the layer's device)."""
    return run_layer_batch(layer, layer_inputs, (sample_index,), device=device)


def iter_layer_outputs(
    layer: nn.Module, layer_inputs: LayerInputs, *, device: torch.device | str | None = None, max_tokens: int = BATCH_TOKENS
) -> Iterator[torch.Tensor]:
    """The layer's output for every sample in order, computed in batches of sample_batches."""
    moved: dict = {}
    for samples in sample_batches(layer_inputs, max_tokens):
        yield from split_batch(run_layer_batch(layer, layer_inputs, samples, device=device, moved=moved), layer_inputs, samples)


def next_layer_inputs(
    layer: nn.Module,
    layer_inputs: LayerInputs,
    *,
    device: torch.device | str | None = None,
    storage_device: torch.device | str | None = None,
) -> LayerInputs:
    """Run `layer` over all samples and return the next layer's inputs, stored where these hidden states are
    (or on `storage_device`)."""
    if storage_device is None:
        storage_device = layer_inputs.hidden_states[0].device
    outputs = [out.to(storage_device) for out in iter_layer_outputs(layer, layer_inputs, device=device)]
    return layer_inputs.advanced(outputs)


def _apply_logit_transform(logits: torch.Tensor, kind: str, value: Any) -> torch.Tensor:
    if kind == "softcap":
        return torch.tanh(logits / value) * value
    if kind == "divide":
        return logits / value
    if kind == "multiply":
        return logits * value
    raise ValueError(f"unknown logit transform '{kind}'")


def finish(model: nn.Module, hidden_states: torch.Tensor, *, spec: ArchitectureSpec | None = None) -> torch.Tensor:
    """Logits from the last decoder layer's output: the model's final norm and head, then the logit transforms its
    CausalLM forward applies (Gemma 2/3 softcapping, Granite scaling, Cohere logit scale)."""
    with torch.no_grad():
        return head_logits(model, hidden_states, spec=spec or get_architecture(model))


def head_modules(model: nn.Module, spec: ArchitectureSpec) -> tuple[nn.Module, nn.Module]:
    """The model's final norm and head."""
    if not spec.norm_path or not spec.head_path:
        raise QtoolError(
            f"no final norm or head is known for model type '{model.config.model_type}'",
            hint="add the family to qtool.models.architectures.ARCHITECTURES",
        )
    return get_module(model, spec.norm_path), get_module(model, spec.head_path)


def head_logits(model: nn.Module, hidden_states: torch.Tensor, *, spec: ArchitectureSpec) -> torch.Tensor:
    """finish() as a differentiable function (recorded by autograd when grad mode is on)."""
    norm, head = head_modules(model, spec)
    hidden = norm(hidden_states.to(_module_device(norm)))
    logits = head(hidden.to(_module_device(head)))
    for kind, field in spec.logit_transforms:
        value = getattr(model.config, field, None)
        if value is not None:
            logits = _apply_logit_transform(logits, kind, value)
    return logits


def layerwise_logits(
    model: nn.Module,
    input_ids: list[torch.Tensor] | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    spec: ArchitectureSpec | None = None,
) -> list[torch.Tensor]:
    """Logits per sample computed layer by layer (capture, every layer, finish): what the model's own forward
    gives, with only one layer's work in flight at a time."""
    spec = spec or get_architecture(model)
    inputs = capture_layer_inputs(model, input_ids, device=device, spec=spec)
    for layer in decoder_layers(model, spec):
        inputs = next_layer_inputs(layer, inputs, device=device)
    return [finish(model, hidden, spec=spec) for hidden in inputs.hidden_states]
