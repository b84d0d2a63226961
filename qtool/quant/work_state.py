"""The saved state of an unfinished quantization run, so that a restart with the same arguments continues from
the last finished layer and ends with a checkpoint bit-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from qtool.core.errors import QtoolError
from qtool.formats.quantized_weight import QuantizedWeight, codes_dtype
from qtool.kernels.profiled_range import STATE_SAVE_RANGE, profiled_range
from qtool.quant.step_writer import StepWriter

STATE_FILE = "job.json"
CHUNK = 1 << 20

log = logging.getLogger(__name__)


def job_fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary name, flushed to disk before the rename: the name never shows a partial file."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# Hidden states of at most this many bytes are saved after every step: an interruption then loses only the step in
# progress. Larger ones (a 7B model's 128 x 2048 calibration tokens: 4 GiB in float32 per step) are saved when the
# work since the last save has taken SAVE_OVERHEAD_RATIO times what that save took, so saving costs at most about
# 1 / SAVE_OVERHEAD_RATIO of the run and an interruption loses about SAVE_OVERHEAD_RATIO saves' worth of work.
HIDDEN_SAVED_EVERY_STEP_BYTES = 1 << 30
SAVE_OVERHEAD_RATIO = 10.0
# Before the first save has been timed, a save is taken to run at this many bytes a second (a device-to-host copy, a
# write with its fsync and a checksum pass over the file): the first resume point then comes after about ten such
# saves' worth of work, not at the first layer (a 7B run of about a minute would otherwise spend seconds on it).
ASSUMED_SAVE_BYTES_PER_SECOND = 1e9


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class HiddenSaveCadence:
    """When a run's step saves the hidden states (and so becomes a resume point): see SAVE_OVERHEAD_RATIO."""

    last_save_seconds: float = 0.0
    since: float = field(default_factory=time.monotonic)  # when the last save ended (at first: the run's start)

    def due(self, index: int, steps: int, hidden_bytes: int) -> bool:
        """Whether step `index` of `steps` is a resume point, saving hidden states of `hidden_bytes`. The last step
        always is, and saves none (kept: no step reads them), so that the run's end is recorded at no cost."""
        if hidden_bytes <= HIDDEN_SAVED_EVERY_STEP_BYTES or index + 1 >= steps:
            return True
        save_seconds = self.last_save_seconds or hidden_bytes / ASSUMED_SAVE_BYTES_PER_SECOND
        return time.monotonic() - self.since >= SAVE_OVERHEAD_RATIO * save_seconds

    @staticmethod
    def kept(index: int, steps: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """What a resume point at step `index` of `steps` saves of its hidden states: none at the last step."""
        return [] if index + 1 >= steps else hidden

    def saved(self, began: float) -> None:
        """A save that began at `began` (time.monotonic()) has ended."""
        self.since = time.monotonic()
        self.last_save_seconds = self.since - began

    def save(self, index: int, steps: int, hidden: list[torch.Tensor],
             write: Callable[[list[torch.Tensor] | None], None] | None, writer: StepWriter | None = None, *,
             hidden_bytes: int | None = None, agree: Callable[[bool], bool] | None = None,
             gather: Callable[[list[torch.Tensor]], list[torch.Tensor] | None] | None = None) -> None:
        """write(hidden) where step `index` of `steps` is due to save them, else write(None): the step's result
        alone (WorkState.save_step's two forms), queued on `writer`'s thread where given. A resume point first
        waits for the saves queued before it, then queues its own with host copies of the hidden states (the next
        steps work meanwhile, and the device's memory is not held for it); what it cost this thread (the wait and
        the copies) times the next decision.

        With several processes every one calls this: `hidden_bytes` is the run's total, `agree` makes all take the
        main process's decision (a broadcast), `gather` brings every process's hidden states to the main one (both
        collectives, entered by all), and `write` is None where a process writes nothing."""
        due = self.due(index, steps, tensors_bytes(hidden) if hidden_bytes is None else hidden_bytes)
        if agree is not None:
            due = agree(due)
        if not due:
            if write is not None and writer is not None:
                writer.submit(after_copies(lambda: write(None)))
            elif write is not None:
                after_copies(lambda: write(None))()
            return
        began = time.monotonic()
        if writer is not None:
            writer.wait()
        kept = self.kept(index, steps, hidden)
        if gather is not None and index + 1 < steps:  # the last step keeps none: nothing to gather
            kept = gather(kept)
        if write is None:
            return
        if writer is None:
            after_copies(lambda: write(kept))()
        else:
            # host tensors are never changed once stored (a disk store's mapping lives as long as they do)
            copies = [h if h.device.type == "cpu" else h.to("cpu", non_blocking=True) for h in kept or []]
            writer.submit(after_copies(lambda: write(copies)))
        self.saved(began)


def after_copies(save: Callable[[], None]) -> Callable[[], None]:
    """save, made to wait (on the thread that runs it) for the device-to-host copies queued on the GPU so far: a
    tensor copied with non_blocking=True lands in pinned host memory without stopping the run's thread."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return save
    copied = torch.cuda.Event()
    copied.record()

    def run() -> None:
        copied.synchronize()
        save()

    return run


def saved_form(qw: QuantizedWeight, non_blocking: bool = False) -> QuantizedWeight:
    """A quantized weight as a run's state keeps it: in host memory, codes uint8 up to 8 bits (int32 above), zeros
    and g_idx int32 (a weight already so is returned as it is). `non_blocking`: copies from a GPU are queued into
    pinned memory and the call returns at once; read them only after after_copies' wait."""
    def host(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)  # on its own device, before the copy
        return tensor.to("cpu", non_blocking=non_blocking)

    return QuantizedWeight(codes=host(qw.codes, codes_dtype(qw.bits)), scales=host(qw.scales), zeros=host(qw.zeros, torch.int32),
                           g_idx=host(qw.g_idx, torch.int32), bits=qw.bits, group_size=qw.group_size)


@dataclass
class WorkState:
    """A folder beside the output: job.json (fingerprint, steps done, the sha256 of every file they rest on),
    one file of results per finished step (a layer quantized or measured), and the hidden states that feed the
    next step. The caller holds the output's lock, so no other run writes here."""

    path: Path
    fingerprint: str
    completed_layers: int = 0
    hidden_file: str | None = None  # the hidden states after the last completed step
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    # steps' files written since the last resume point -> their sha256, taken as each was written (the resume point
    # that records them then reads none of them again)
    unrecorded: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def folder_for(output: Path) -> Path:
        return output.parent / f".{output.name}.qtool-partial"

    @classmethod
    def open(cls, output: Path, fingerprint: str, discard: bool = False) -> "WorkState":
        """Resume a matching unfinished run whose files are intact, or start afresh: state left by other
        arguments, a damaged one or one the caller discards is removed, with one warning line saying why."""
        path = cls.folder_for(output)
        if path.exists():
            problem = "discarded (--discard-resume)" if discard else _problem(path, fingerprint)
            if problem is None:
                saved = json.loads((path / STATE_FILE).read_text())
                return cls(path, fingerprint, saved["completed_layers"], saved["hidden_file"], saved["checksums"])
            log.warning("the saved state of an interrupted run in %s is %s: starting over", path, problem)
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise QtoolError(f"cannot create the resume state {path}: {exc.strerror or exc}", "choose an output in a folder you can write to") from exc
        state = cls(path, fingerprint)
        state._write_state()
        return state

    def _write_state(self) -> None:
        data = {"fingerprint": self.fingerprint, "completed_layers": self.completed_layers, "hidden_file": self.hidden_file,
                "checksums": self.checksums}
        _write_atomically(self.path / STATE_FILE, lambda p: p.write_text(json.dumps(data)))

    def layer_file(self, index: int) -> Path:
        return self.path / f"layer-{index:04d}.safetensors"

    def save_step(self, index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  next_hidden: list[torch.Tensor] | None) -> None:
        """Write the result of step `index` (a layer's tensors and string metadata) and the inputs of the next
        step, then record every step up to `index` as done. The new files are written (under new names for the
        hidden states) before job.json moves on, and the old hidden states removed after it, so an interruption
        at any point leaves job.json naming intact files. next_hidden None: the step's result alone is written
        and nothing is recorded as done yet (a resume redoes it); the next step saved with its hidden states
        records it (HiddenSaveCadence says when that is worth its cost)."""
        with profiled_range(STATE_SAVE_RANGE):
            layer = self.layer_file(index)
            tensors = {name: t.contiguous() for name, t in tensors.items()}
            _write_atomically(layer, lambda p: save_file(tensors, str(p), metadata=metadata))
            self.unrecorded[layer.name] = sha256_of(layer)
            if next_hidden is None:
                return
            hidden_file = f"hidden-{index + 1:04d}.safetensors"
            hidden = {f"batch.{i}": h.contiguous() for i, h in enumerate(next_hidden)}
            _write_atomically(self.path / hidden_file, lambda p: save_file(hidden, str(p)))
            previous = self.hidden_file
            self.checksums.pop(previous, None)
            for done in range(self.completed_layers, index + 1):  # this step and those written without hidden states
                name = self.layer_file(done).name
                self.checksums[name] = self.unrecorded.pop(name, None) or sha256_of(self.layer_file(done))
            self.checksums[hidden_file] = sha256_of(self.path / hidden_file)
            self.completed_layers, self.hidden_file = index + 1, hidden_file
            self._write_state()
            if previous is not None and previous != hidden_file:
                (self.path / previous).unlink(missing_ok=True)

    def load_step(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A step's tensors and metadata, from one open of its file."""
        from safetensors import safe_open

        with safe_open(str(self.layer_file(index)), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {}

    def step_metadata(self, index: int) -> dict[str, str]:
        """A step's metadata alone (the file's header)."""
        from safetensors import safe_open

        with safe_open(str(self.layer_file(index)), framework="pt") as handle:
            return handle.metadata() or {}

    def save_layer(self, index: int, quantized: dict[str, QuantizedWeight], next_hidden: list[torch.Tensor] | None) -> None:
        """save_step for a layer of GPTQ weights."""
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {}
        for name, qw in quantized.items():
            qw = saved_form(qw)
            tensors[f"{name}.codes"] = qw.codes
            tensors[f"{name}.scales"] = qw.scales
            tensors[f"{name}.zeros"] = qw.zeros
            tensors[f"{name}.g_idx"] = qw.g_idx
            metadata[name] = json.dumps({"bits": qw.bits, "group_size": qw.group_size})
        self.save_step(index, tensors, metadata, next_hidden)

    def load_layer(self, index: int) -> dict[str, QuantizedWeight]:
        tensors, metadata = self.load_step(index)
        quantized = {}
        for name, fields in metadata.items():
            facts = json.loads(fields)
            quantized[name] = QuantizedWeight(
                codes=tensors[f"{name}.codes"],  # uint8 up to 8 bits, as saved: the packer reads it as it is
                scales=tensors[f"{name}.scales"],
                zeros=tensors[f"{name}.zeros"],
                g_idx=tensors[f"{name}.g_idx"],
                bits=facts["bits"],
                group_size=facts["group_size"],
            )
        return quantized

    def load_hidden(self) -> list[torch.Tensor]:
        return read_hidden(self.path / self.hidden_file)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def read_hidden(path: Path) -> list[torch.Tensor]:
    """The hidden states a step saved, in sample order (what the other processes of a run read)."""
    tensors = load_file(str(path))
    return [tensors[f"batch.{i}"] for i in range(len(tensors))]


def _problem(path: Path, fingerprint: str) -> str | None:
    """Why the state in `path` can't be resumed by the run of `fingerprint` (None: it can)."""
    try:
        saved = json.loads((path / STATE_FILE).read_text())
        completed, hidden_file, checksums = int(saved["completed_layers"]), saved["hidden_file"], dict(saved["checksums"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable ({STATE_FILE} is missing, damaged or from an older qtool)"
    if saved.get("fingerprint") != fingerprint:
        return "from a run with other arguments, model or qtool version"
    needed = [f"layer-{index:04d}.safetensors" for index in range(completed)] + ([hidden_file] if completed else [])
    for name in needed:
        if name not in checksums or not (path / name).is_file():
            return f"missing {name}"
        if sha256_of(path / name) != checksums[name]:
            return f"damaged ({name} does not match its checksum)"
    return None


W = TypeVar("W")


class SavedWeights(Mapping[str, W]):
    """The quantized weights of saved steps, read from the state's files when asked (`load(step)` gives one step's
    weights by name) and in step order when iterated, one step's file held at a time: writing the checkpoint then
    never holds the whole quantized model (whose codes take as much memory as the float32 model). A writer that
    asks for the weights in step order reads each file once; its names come from the headers alone."""

    def __init__(self, state: WorkState, steps: Iterable[int], load: Callable[[int], dict[str, W]]):
        from safetensors import safe_open

        self.state = state
        self._load = load
        self._step_of: dict[str, int] = {}
        for index in steps:
            with safe_open(str(state.layer_file(index)), framework="pt") as handle:
                for name in handle.metadata() or {}:
                    self._step_of[name] = index
        self._cached: tuple[int, dict[str, W]] | None = None
        self.loads: list[int] = []  # the steps read, in order (each once when asked in order)

    def __getitem__(self, name: str) -> W:
        index = self._step_of[name]
        if self._cached is None or self._cached[0] != index:
            self._cached = None  # drop the previous step before reading the next
            self._cached = (index, self._load(index))
            self.loads.append(index)
        return self._cached[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._step_of)

    def __len__(self) -> int:
        return len(self._step_of)
