"""The float model a quantization run reads: streamed (qtool.checkpoints.streamed_model: the layers' weights read
from the files one layer at a time) when the source is a local safetensors directory or a GGUF file qtool maps,
else loaded whole through load_model (GGUF families only transformers reads, remote code, pickled weights)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import nn

from qtool.checkpoints.sources import ModelSource, download_from_hub, load_model, load_tokenizer
from qtool.checkpoints.streamed_model import NotStreamable, StreamedModel, open_streamed_gguf, open_streamed_safetensors
from qtool.core.errors import QtoolError
from qtool.models.architectures import ArchitectureSpec, decoder_layers, get_architecture

log = logging.getLogger(__name__)


@dataclass
class FloatModel:
    model: nn.Module
    tokenizer: Any
    spec: ArchitectureSpec
    streamed: StreamedModel | None  # None: every weight is in memory
    # a decoder layer whose weights a background thread is reading (read_ahead), and that read
    _ahead: tuple[int, Future] | None = field(default=None, repr=False)

    def layer_prefix(self, index: int) -> str:
        return f"{self.spec.layers_path}.{index}."

    def materialize_layer(self, index: int) -> None:
        """Read decoder layer `index`'s weights (nothing to do for a model loaded whole); a read-ahead of it is
        waited for and used (one of another layer is kept for its turn)."""
        if self.streamed is None:
            return
        already_read = None
        if self._ahead is not None and self._ahead[0] == index:
            (_, read), self._ahead = self._ahead, None
            already_read = read.result()
        self.streamed.materialize(self.layer_prefix(index), already_read=already_read)

    def read_ahead(self, index: int, pin: bool = False) -> None:
        """Start reading decoder layer `index`'s weights in a background thread, so that the disk read and the
        conversion to float32 overlap the current layer's work; materialize_layer(index) then takes them. Nothing
        for a model loaded whole or past the last layer. One layer ahead at most (its float32 weights in memory).
        `pin`: the weights are put in pinned memory there too, so that moving the layer to the GPU is a fast copy
        (a 7B layer's 0.8 GB: about 0.2 s from pageable memory, a fraction of it from pinned)."""
        if self.streamed is None or index >= len(decoder_layers(self.model, self.spec)):
            return
        names = self.streamed.unread(self.layer_prefix(index))  # on this thread: the model is not shared
        read: Future = Future()

        def read_layer() -> None:
            try:
                tensors = self.streamed.read_tensors(names)
                read.set_result({name: t.pin_memory() for name, t in tensors.items()} if pin else tensors)
            except BaseException as exc:  # raised where the layer is materialized
                read.set_exception(exc)

        # a thread per layer, ending with its read: none is left behind by a run that stops early
        threading.Thread(target=read_layer, name=f"qtool-read-layer-{index}", daemon=True).start()
        self._ahead = (index, read)

    def release_layer(self, index: int) -> None:
        """Drop decoder layer `index`'s weights once its quantized form is saved (the checkpoint writer reads its
        float tensors, e.g. the norms, from the files again)."""
        if self.streamed is not None:
            self.streamed.release(self.layer_prefix(index))

    @contextmanager
    def layer_in_memory(self, index: int, read_next: bool = False) -> Iterator[None]:
        """Decoder layer `index`'s weights read for the block and dropped after it (a model loaded whole keeps them);
        `read_next`: the next layer's are read meanwhile (read_ahead)."""
        self.materialize_layer(index)
        if read_next:
            self.read_ahead(index + 1)
        try:
            yield
        finally:
            self.release_layer(index)


def _why_not_streamed(source: ModelSource, trust_remote_code: bool) -> str | None:
    if source.quantization_config:
        return "it declares a quantization"  # the whole-model path gives the error about it
    if trust_remote_code:
        return "its model class is remote code, which may build its weights in its own way"
    return None


def _open_streamed(source: ModelSource) -> StreamedModel | NotStreamable:
    if source.kind == "gguf":
        return open_streamed_gguf(source.path / source.gguf_file)
    return open_streamed_safetensors(source.path)


def open_float_model(source: ModelSource, model_spec: str, allow_pickle: bool = False, trust_remote_code: bool = False,
                     streaming: bool | None = None) -> FloatModel:
    """The float model of `source` with its tokenizer. `streaming` None streams where the source allows it, True
    insists (a QtoolError says why it cannot), False loads the whole model. A source whose files cannot be read
    tensor by tensor (open_streamed_* say why) loads whole, so that load_model names what is wrong with a damaged
    one; any other error of the streaming code propagates."""
    streamed = None
    if streaming is not False:
        if source.kind == "hub":
            source = ModelSource("hf_dir", download_from_hub(source.repo_id), repo_id=source.repo_id, display=source.display)
        reason = _why_not_streamed(source, trust_remote_code)
        if reason is None:
            opened = _open_streamed(source)
            if isinstance(opened, NotStreamable):
                reason = opened.reason
            else:
                streamed = opened
        if streamed is None and streaming:
            raise QtoolError(f"model {model_spec} cannot be streamed: {reason}", "leave streaming to its default (auto)")
        if streamed is None:
            log.info("loading %s whole: %s", model_spec, reason)
    if streamed is not None:
        # read after the files are known to be sound, as load_model does: a damaged config.json is reported by
        # the model loader rather than by the tokenizer's
        tokenizer = load_tokenizer(source, trust_remote_code)
        spec = get_architecture(streamed.model)
        # embeddings, final norm, head and any other weight outside the decoder layers stay in memory
        streamed.materialize(exclude=f"{spec.layers_path}.")
        return FloatModel(streamed.model, tokenizer, spec, streamed)
    loaded = load_model(source, device="cpu", dtype="float32", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if loaded.quantization_config:
        raise QtoolError(f"model {model_spec} is already quantized ({loaded.quantization_config.get('quant_method')})", "quantize a float model")
    return FloatModel(loaded.model, loaded.tokenizer, get_architecture(loaded.model), None)
