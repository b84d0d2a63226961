"""`qtool quantize` as a library call: load the float model, cut the calibration windows, quantize the decoder
layers one by one (each layer's inputs come from the layers already quantized), and write the GPTQ checkpoint.

Work is saved after every layer beside the output, so a run interrupted and restarted with the same arguments
continues where it stopped and ends with the same bytes as an uninterrupted run."""

from __future__ import annotations

import functools
import logging
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, raise_first_error
from qtool.core.host_memory import give_back_freed_memory
from qtool.core.output_claim import claimed_output
from qtool.core.output_path import check_output_path
from qtool.models.rules import (ACTIVATION_TIERS, ModelStats, activation_dtype, cpu_free_memory, device_free_memory, estimate_peak_memory,
                                format_bytes, replay_note, resolve_compute_dtype, validate_for_hardware, validate_for_model)
from qtool.config.schema import QuantConfig
from qtool.checkpoints.gptq_checkpoint import DEFAULT_MAX_SHARD_SIZE_BYTES, save_quantized_model
from qtool.formats.gptq_config import qtool_version
from qtool.formats.gptq import check_gptq_layout
from qtool.data.text import calibration_windows
from qtool.quant.distributed import SINGLE_PROCESS, Collective, check_nproc, contiguous_shares, launch
from qtool.quant.float_source import FloatModel, open_float_model
from qtool.quant.activation_store import ActivationStore, open_store
from qtool.quant.memory_ladder import LadderRun, Rung
from qtool.quant.gpu_budget import check_gpu_budget, gpu_memory_budget
from qtool.quant.shared_calibration import SharedCalibration
from qtool.quant.step_writer import StepWriter
from qtool.quant.layer_quantizer import ModuleReport, quantize_layer, solve_group
from qtool.formats.quantized_weight import QuantizedWeight
from qtool.quant.work_state import HiddenSaveCadence, SavedWeights, WorkState, job_fingerprint, read_hidden, saved_form, tensors_bytes
from qtool.models.architectures import decoder_layers, resolve_layer_groups
from qtool.models.layerwise import BATCH_TOKENS, LayerInputs, capture_layer_inputs, run_layer_batch, sample_batches, split_batch, subset_inputs
from qtool.checkpoints.sources import ModelSource, resolve_device, resolve_source

log = logging.getLogger(__name__)

# (layers done, layers in all, what is being worked on)
Progress = Callable[[int, int, str], None]

# Calibration activations stay on the GPU only while they use at most this share of its free memory.
ACTIVATIONS_GPU_SHARE = 0.25


@dataclass
class QuantizeResult:
    output: str
    config: QuantConfig
    layers: int
    quantized_linears: int
    skipped_linears: dict[str, str]  # name -> why it stays float
    resumed_from_layer: int
    seconds: float
    peak_memory_bytes: int
    device: str
    calibration_tokens: int
    compute_dtype: str = "float32"  # what config.compute_dtype resolved to on this machine
    # validate's estimate of peak_memory_bytes, made before the run (one process's, on the device that does the work)
    estimated_peak_memory_bytes: int = 0
    # the estimate in full (components, where the activations went, replay) and the measured peaks of host (resident
    # set size) and device, beside whether the weights were streamed
    memory: dict[str, Any] = field(default_factory=dict)
    modules: list[ModuleReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        data["findings"] = [f.to_dict() for f in self.findings]
        return data


def source_identity(source: ModelSource) -> dict[str, Any]:
    """What identifies the input model's weights for resuming: its files with their sizes and times."""
    if source.path is None:
        return {"display": source.display}
    files = [source.path / source.gguf_file] if source.gguf_file else sorted(source.path.glob("*.safetensors"))
    return {
        "display": source.display,
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()],
    }


def storage_device(compute: torch.device, samples: int, seqlen: int, hidden_size: int) -> torch.device:
    """Calibration activations live on the GPU when they fit comfortably, else on the CPU."""
    if compute.type != "cuda":
        return compute
    free, _ = torch.cuda.mem_get_info(compute)
    # inputs, outputs and the recorded linear outputs of one layer: a few copies of the hidden states
    needed = 6 * samples * seqlen * hidden_size * 4
    return compute if needed <= ACTIVATIONS_GPU_SHARE * free else torch.device("cpu")


def check_activation_tier(tier: str) -> None:
    if tier not in ACTIVATION_TIERS:
        raise QtoolError(f"activation tier {tier!r} is not known", "use one of " + ", ".join(ACTIVATION_TIERS))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_host_memory_bytes()


def peak_host_memory_bytes() -> int:
    """The process's peak resident set size so far."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# the progress detail that carries the estimate, said before any layer (the CLI prints it as a line of its own)
ESTIMATE_DETAIL = "estimated peak memory"


def estimate_line(estimate: dict[str, Any], compute: torch.device) -> str:
    """The estimate in one line: the peak on each pool and where the activations wait between layers."""
    pools = [f"host {format_bytes(estimate['cpu_bytes'])}"]
    if compute.type == "cuda":
        pools.append(f"{compute} {format_bytes(estimate['device_bytes'])}")
    if estimate["disk_bytes"]:
        pools.append(f"disk {format_bytes(estimate['disk_bytes'])}")
    places = {"device": f"on {compute}", "host": "in host memory", "disk": "on disk"}
    weighing = estimate.get("weighing_tier")
    return (f"{ESTIMATE_DETAIL}: {', '.join(pools)}; weights {'streamed layer by layer' if estimate['streaming'] else 'loaded whole'}, "
            f"activations {places[estimate['activation_tier']]}" + replay_note(estimate)
            + (f", the weighing pass's layer inputs {places[weighing]}" if weighing else ""))


def split_quantizable(
    groups: list[list[tuple[str, nn.Linear]]], check_layout: Callable[[nn.Linear, str], None]
) -> tuple[list[list[tuple[str, nn.Linear]]], dict[str, str]]:
    """Drop the linears the output format cannot hold (check_layout raises a QtoolError for them): they stay
    float, as in GPTQModel, and the checkpoint says so (GPTQ's `dynamic` exclusions)."""
    kept_groups: list[list[tuple[str, nn.Linear]]] = []
    skipped: dict[str, str] = {}
    for group in groups:
        kept = []
        for name, linear in group:
            try:
                check_layout(linear, name)
            except QtoolError as exc:
                skipped[name] = exc.message
                continue
            kept.append((name, linear))
        if kept:
            kept_groups.append(kept)
    return kept_groups, skipped


def gptq_layout_check(config: QuantConfig) -> Callable[[nn.Linear, str], None]:
    return lambda linear, name: check_gptq_layout(linear.in_features, linear.out_features, config.bits, config.group_size, name)


def checkpoint_quantization_config(config: QuantConfig, skipped: dict[str, str], calibration_tokens: int, compute_dtype: str = "float32") -> dict[str, Any]:
    """The quantization_config written into config.json: GPTQModel's fields, the skipped linears as `dynamic`
    exclusions, and the whole qtool config (so the job can be read back exactly)."""
    data: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        # act order needs a Hessian: round to nearest keeps the natural column order whatever the config says
        "desc_act": config.desc_act and config.method == "gptq",
        "sym": config.sym,
        "static_groups": config.static_groups and config.method == "gptq",
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "damp_auto_increment": config.damp_auto_increment,
        "mse": 2.4 if config.mse else 0.0,
        "checkpoint_format": config.checkpoint_format,
        "meta": {
            "quantizer": [f"qtool:{qtool_version()}"],
            "qtool_config": config.to_dict(),
            "calibration_tokens": calibration_tokens,
            "compute_dtype": compute_dtype,
        },
    }
    if skipped:
        data["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in sorted(skipped)}
    return data


def check_against_model(config: QuantConfig, model: nn.Module, spec: Any, compute: torch.device, processes: int = 1,
                        streaming: bool = False, cpu_free_bytes: int | None = None, device_free_bytes: int | None = None,
                        weighing: bool = True) -> list[Finding]:
    """The model-aware and hardware rules of the shared validator, before any calibration work: raise the first
    error, return the rest."""
    shapes = {
        name: (linear.in_features, linear.out_features)
        for index in range(len(decoder_layers(model, spec)))
        for group in resolve_layer_groups(model, index, spec)
        for name, linear in group
    }
    findings = validate_for_model(config, shapes)
    findings += validate_for_hardware(config, ModelStats.from_config(model.config), compute, processes=processes, streaming=streaming,
                                      cpu_free_bytes=cpu_free_bytes, device_free_bytes=device_free_bytes, weighing=weighing)
    return raise_first_error(findings)


def _relative(groups: list[list[tuple[str, nn.Linear]]], prefix: str) -> list[list[tuple[str, nn.Linear]]]:
    return [[(name.removeprefix(prefix), linear) for name, linear in group] for group in groups]


def source_inputs(source: ModelSource, calibration_source: str, *others: str | Path | None) -> list[Path]:
    """The local files and folders a run reads, which its output must neither be, sit inside nor hold."""
    inputs = [source.path / source.gguf_file] if source.gguf_file else ([source.path] if source.path is not None else [])
    if Path(calibration_source).exists():  # `wikitext` names a data set, not a path
        inputs.append(Path(calibration_source))
    return inputs + [Path(other) for other in others if other is not None]


@dataclass
class _QuantizeJob:
    """What both ways of quantizing (calibrated and round-to-nearest) share: the loaded model and where and how
    its checkpoint is written."""

    model: nn.Module
    tokenizer: Any
    config: QuantConfig
    output: Path
    force: bool
    report: Callable[..., None]
    started: float
    compute: torch.device
    findings: list[Finding]
    num_layers: int
    model_name: str
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES
    estimated_peak_bytes: int = 0
    float_model: FloatModel | None = None
    estimate: dict[str, Any] = field(default_factory=dict)

    def write_checkpoint(self, quantized: Mapping[str, QuantizedWeight], skipped: dict[str, str],
                         modules: list[ModuleReport], calibration_tokens: int = 0, compute_dtype: str = "float32",
                         resumed_from: int = 0, peak: int | None = None, host_peak: int | None = None) -> QuantizeResult:
        if not quantized:
            raise QtoolError(f"no linear of {self.model_name} can be stored in the GPTQ layout",
                             "GPTQ needs input and output widths that are multiples of 32")
        self.report(self.num_layers, self.num_layers, "writing checkpoint")
        save_quantized_model(
            self.output, self.model, quantized,
            quantization_config=checkpoint_quantization_config(self.config, skipped, calibration_tokens, compute_dtype),
            tokenizer=self.tokenizer, checkpoint_format=self.config.checkpoint_format, force=self.force,
            max_shard_size_bytes=self.max_shard_size_bytes,
            float_tensor=self.float_model.streamed.float_tensor if self.float_model and self.float_model.streamed else None,
            pack_device=self.compute,
        )
        # the write itself may be the host's peak (one shard's tensors)
        host_peak = max(host_peak or 0, peak_host_memory_bytes())
        peak = peak_memory_bytes(self.compute) if peak is None else peak
        if self.compute.type == "cpu":
            peak = max(peak, host_peak)
        memory = {"estimate": self.estimate, "peak_host_bytes": host_peak,
                  "peak_device_bytes": peak if self.compute.type == "cuda" else 0}
        return QuantizeResult(
            output=str(self.output), config=self.config, layers=self.num_layers, quantized_linears=len(quantized),
            skipped_linears=skipped, resumed_from_layer=resumed_from, seconds=time.perf_counter() - self.started,
            peak_memory_bytes=peak, device=str(self.compute),
            calibration_tokens=calibration_tokens, compute_dtype=compute_dtype, modules=modules, findings=self.findings,
            estimated_peak_memory_bytes=self.estimated_peak_bytes, memory=memory,
        )


def _round_to_nearest(job: _QuantizeJob, spec) -> QuantizeResult:
    quantized: dict[str, QuantizedWeight] = {}
    skipped: dict[str, str] = {}
    modules: list[ModuleReport] = []
    for index in range(job.num_layers):
        job.report(index, job.num_layers, f"layer {index + 1}/{job.num_layers}")
        groups, layer_skipped = split_quantizable(resolve_layer_groups(job.model, index, spec), gptq_layout_check(job.config))
        skipped.update(layer_skipped)
        job.float_model.materialize_layer(index)
        for group in groups:
            layer_quantized, reports = solve_group(group, None, job.config)
            quantized.update(layer_quantized)
            modules.extend(reports)
        job.float_model.release_layer(index)
    return job.write_checkpoint(quantized, skipped, modules)


def quantize_model(
    model_spec: str | Path,
    config: QuantConfig,
    output: str | Path,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    discard_resume: bool = False,
    nproc: int = 1,
    shared: SharedCalibration | None = None,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
    streaming: bool | None = None,
    activation_tier: str | None = None,
    gpu_memory_bytes: int | None = None,
) -> QuantizeResult:
    """Quantize `model_spec` with `config` (already validated) into a GPTQ checkpoint at `output`. The state
    beside the output is saved after every layer and resumed by the next run with the same arguments (unless
    `discard_resume`); the output is locked against other runs until the checkpoint is written.

    `nproc` > 1 spawns that many processes (gloo on the CPU, nccl with one GPU each): the calibration batches are
    split between them, each group's Hessian summed over them, each GPTQ solve run once (rank 0) and broadcast,
    and rank 0 writes; the checkpoint and the resume state are those of a one-process run.

    The checkpoint's safetensors are cut into shards of at most `max_shard_size_bytes` (a larger tensor has a
    shard of its own), listed in model.safetensors.index.json, as transformers writes them.

    `shared` (one process only) carries what jobs on the same model reuse: the tokenized calibration windows and
    the Hessians of layer 0's float inputs (see qtool.quant.shared_calibration); the bytes written are the same.

    `streaming` (None: wherever the source allows, see qtool.quant.float_source) reads each decoder layer's weights
    from the model's files just before it is quantized and drops them once it is saved, so host memory holds one
    layer, not the model; the checkpoint is the same. `activation_tier` (device, host or disk; None: the memory
    estimate's plan for the free memory) says where the calibration activations wait between layers.
    `gpu_memory_bytes` holds each process to that much of its GPU's memory (qtool.quant.gpu_budget): the plan is
    made for it and a layer that outgrows it goes down the memory ladder; the checkpoint is the same."""
    started = time.perf_counter()
    check_output_path(output)  # a refused path fails before a Hub model is fetched
    compute = resolve_device(device)
    if config.output_format != "gptq":
        raise QtoolError(f"output_format {config.output_format!r} is not written by this pipeline", "use output_format gptq")
    check_nproc(nproc, compute)
    check_gpu_budget(gpu_memory_bytes, compute)
    if activation_tier is not None:
        check_activation_tier(activation_tier)
    if nproc > 1 and config.method != "gptq":
        raise QtoolError(f"--nproc {nproc} with method {config.method}: round to nearest has no calibration to split", "use --nproc 1, or method gptq")
    source = resolve_source(model_spec)
    with claimed_output(output, force, source_inputs(source, config.calibration.source)) as output:
        args = (model_spec, source, config, output, compute, force, allow_pickle, trust_remote_code, discard_resume, started,
                max_shard_size_bytes, streaming, activation_tier, gpu_memory_bytes)
        if nproc == 1:
            return _quantize(SINGLE_PROCESS, progress, *args, shared=shared)
        return launch(nproc, compute.type, _quantize, args, progress)


def _rank_inputs(inputs: LayerInputs, collective: Collective, batch_tokens: int = BATCH_TOKENS) -> tuple[LayerInputs, list[int], list[list[int]]]:
    """This process's share of the calibration samples: whole batches of the one-process run (so every batch, and
    every product computed from it, is the one that run computes), contiguous, about equal in tokens. Returns the
    share, its sample indices, and every process's sample indices."""
    batches = sample_batches(inputs, batch_tokens)
    tokens = [sum(inputs.hidden_states[i].shape[0] * inputs.hidden_states[i].shape[1] for i in batch) for batch in batches]
    shares = [[i for b in share for i in batches[b]] for share in contiguous_shares(tokens, collective.world_size)]
    mine = shares[collective.rank]
    return subset_inputs(inputs, mine), mine, shares


def _quantize(collective: Collective, progress: Progress | None, model_spec: str | Path, source: ModelSource, config: QuantConfig,
              output: Path, compute: torch.device, force: bool, allow_pickle: bool, trust_remote_code: bool, discard_resume: bool,
              started: float, max_shard_size_bytes: int, streaming: bool | None = None, activation_tier: str | None = None,
              gpu_memory_bytes: int | None = None, shared: SharedCalibration | None = None) -> QuantizeResult | None:
    """One process's part of quantize_model (the whole of it in a one-process run), within its GPU memory budget;
    rank 0 returns the result."""
    if collective.world_size > 1:
        compute = collective.device
    with gpu_memory_budget(compute, gpu_memory_bytes):
        return _quantize_process(collective, progress, model_spec, source, config, output, compute, force, allow_pickle,
                                 trust_remote_code, discard_resume, started, max_shard_size_bytes, streaming, activation_tier,
                                 shared)


def _quantize_process(collective: Collective, progress: Progress | None, model_spec: str | Path, source: ModelSource,
                      config: QuantConfig, output: Path, compute: torch.device, force: bool, allow_pickle: bool,
                      trust_remote_code: bool, discard_resume: bool, started: float, max_shard_size_bytes: int,
                      streaming: bool | None, activation_tier: str | None,
                      shared: SharedCalibration | None) -> QuantizeResult | None:
    report = progress or (lambda done, total, detail="": None)
    # The float model stays on the CPU in float32 (streamed: one decoder layer of it at a time); each layer visits
    # the compute device while it is quantized.
    float_model = open_float_model(source, str(model_spec), allow_pickle, trust_remote_code, streaming)
    model, tokenizer, spec = float_model.model, float_model.tokenizer, float_model.spec
    if tokenizer is None:
        raise QtoolError(f"model {model_spec} has no tokenizer", "calibration text must be tokenized: add the tokenizer files to the model directory")
    layers = decoder_layers(model, spec)
    num_layers = len(layers)
    is_streamed = float_model.streamed is not None
    # the free memory read once: the rule below and the plan the run follows judge the same figures
    free = {"cpu_free_bytes": cpu_free_memory(), "device_free_bytes": device_free_memory(compute)}
    findings = check_against_model(config, model, spec, compute, collective.world_size, streaming=is_streamed, **free)
    # the estimate validate's memory rule judged, said before the work starts and returned beside the measured peak
    estimate = estimate_peak_memory(config, ModelStats.from_config(model.config), compute, collective.world_size, streaming=is_streamed,
                                    tier=activation_tier, **free)
    estimate = collective.broadcast_object(estimate)  # every process follows rank 0's plan
    estimated_peak = estimate["device_bytes"] if compute.type == "cuda" else estimate["cpu_bytes"] // collective.world_size
    report(0, num_layers, estimate_line(estimate, compute))
    log.info("%s (%s)", estimate_line(estimate, compute), ", ".join(f"{name} {format_bytes(size)}" for name, size in estimate["components"].items()))

    job = _QuantizeJob(model, tokenizer, config, output, force, report, started, compute, findings, num_layers,
                       str(model_spec), max_shard_size_bytes, estimated_peak, float_model, estimate)
    if config.method == "rtn":
        # Round to nearest looks at the weights alone: no calibration, no forward passes, nothing to resume.
        return _round_to_nearest(job, spec)

    calibration = config.calibration
    calibration_key = job_fingerprint({"model": source_identity(source), "calibration": asdict(calibration)})
    if shared is not None and calibration_key in shared.windows:
        windows = shared.windows[calibration_key]
        shared.windows_reused += 1
    else:
        windows = calibration_windows(tokenizer, calibration.source, calibration.samples, calibration.seqlen, calibration.seed)
        if shared is not None:
            shared.windows[calibration_key] = windows
    calibration_tokens = sum(w.numel() for w in windows)

    hidden_size = getattr(model.config, "hidden_size", None)
    compute_dtype = str(resolve_compute_dtype(config.compute_dtype, compute, hidden_size)).removeprefix("torch.")
    stored_dtype = activation_dtype(config, compute, hidden_size)  # the activations between layers (the estimate's)
    # The process count is not part of the job: N processes leave the state one process would, so either resumes it.
    fingerprint = job_fingerprint({
        "config": config.to_dict(),
        "compute_dtype": compute_dtype,
        "model": source_identity(source),
        "qtool": qtool_version(),
        "torch": torch.__version__,
        "device": compute.type,
    })
    state = WorkState.open(output, fingerprint, discard=discard_resume) if collective.is_main else None
    resumed_from, hidden_file = collective.broadcast_object(
        (state.completed_layers, state.hidden_file and str(state.path / state.hidden_file)) if state else None)
    if resumed_from and collective.is_main:
        log.info("resuming %s after layer %d of %d", output, resumed_from, num_layers)

    with open_store(estimate["activation_tier"], compute, output, estimate["disk_bytes"]) as store, StepWriter() as writer:
        report(0, num_layers, "capturing calibration inputs")
        inputs: LayerInputs = capture_layer_inputs(model, windows, device="cpu", storage_device="cpu", spec=spec)
        if resumed_from:
            # the saved hidden states are every sample's, as a one-process run leaves them
            inputs = LayerInputs(resumed_from, tuple(read_hidden(Path(hidden_file))), inputs.calls)
        sample_shapes = [tuple(h.shape) for h in inputs.hidden_states]
        inputs, mine, shares = _rank_inputs(inputs, collective, config.calibration.batch_tokens or BATCH_TOKENS)
        inputs = LayerInputs(inputs.layer_index, store.store([h.to(stored_dtype) for h in inputs.hidden_states]), inputs.calls)
        collective.barrier()  # every process has read the saved state before rank 0 moves it on

        skipped: dict[str, str] = {}
        modules: list[ModuleReport] = []
        def rehome(host: ActivationStore) -> None:  # from here on the activations stay in host memory
            nonlocal inputs
            inputs = LayerInputs(inputs.layer_index, host.store(inputs.hidden_states), inputs.calls)

        # Out of GPU memory inside a layer, one process redoes it lower down the ladder and stays there; with several
        # processes, one that ran out cannot redo its share alone while the others wait in a collective: it fails.
        run = LadderRun(store, compute, rehome)
        cadence = HiddenSaveCadence()
        if collective.world_size > 1:
            run.rungs = run.rungs[:1]
        for index in range(num_layers):
            prefix = f"{spec.layers_path}.{index}."
            groups, layer_skipped = split_quantizable(resolve_layer_groups(model, index, spec), gptq_layout_check(config))
            skipped.update(layer_skipped)
            if index < resumed_from:
                continue
            report(index, num_layers, f"layer {index + 1}/{num_layers}")
            float_model.materialize_layer(index)
            float_model.read_ahead(index + 1, pin=compute.type == "cuda")
            # what a redo lower down the ladder starts from: a streamed layer is read from its files again, a layer of
            # a model loaded whole is copied now
            original = None if is_streamed else {name: t.detach().clone() for name, t in layers[index].state_dict().items()}

            def attempt(rung: Rung, index: int = index, groups=groups, prefix: str = prefix):
                layer = layers[index].to(rung.compute)
                layer_inputs = inputs
                batches = sample_batches(layer_inputs, rung.max_batch_tokens or config.calibration.batch_tokens or BATCH_TOKENS)
                moved: dict = {}

                def run_batch(batch: int) -> torch.Tensor:
                    return run_layer_batch(layer, layer_inputs, batches[batch], device=rung.compute, moved=moved)

                def on_group(modules: str) -> None:
                    report(index, num_layers, f"layer {index + 1}/{num_layers} {modules}")

                float_hessians = None
                if shared is not None and index == 0 and rung.compute == compute:
                    float_hessians = shared.hessians_for(job_fingerprint({"calibration": calibration_key, "compute_dtype": compute_dtype, "device": compute.type}))
                layer_quantized, layer_reports, batch_outputs = quantize_layer(
                    layer, _relative(groups, prefix), len(batches), run_batch, config, run.store.device, on_group=on_group,
                    output_projections=spec.output_projections, collective=collective, float_hessians=float_hessians,
                    replay=estimate["replay"], replay_blocks=estimate.get("replay_blocks", False), hidden_size=hidden_size,
                )
                outputs = [h.to(stored_dtype) for out, samples in zip(batch_outputs, batches)
                           for h in split_batch(out, layer_inputs, samples)]
                return layer, layer_quantized, layer_reports, outputs

            def restore(index: int = index, original: dict | None = original) -> None:
                if original is None:  # the groups solved so far changed the weights: the files hold the float ones
                    layers[index].to("cpu")
                    float_model.release_layer(index)
                    float_model.materialize_layer(index)
                else:
                    layers[index].load_state_dict(original)
                    layers[index].to("cpu")

            layer, layer_quantized, layer_reports, outputs = run.climb(f"layer {index + 1}/{num_layers}", attempt, restore)
            if not is_streamed:  # a streamed layer is dropped where it is, below (no copy back to the host)
                layers[index] = layer.to("cpu")
            for module_report in layer_reports:
                module_report.name = prefix + module_report.name
                log.debug("%s: error %.4g, damp %.4f, %.2fs", module_report.name, module_report.error, module_report.damp_percent, module_report.seconds)
            modules.extend(layer_reports)
            next_hidden = list(run.store.store(outputs))
            del outputs
            # Rank 0 saves every sample's hidden states (the others send theirs), so the state is a one-process run's;
            # it decides for all whether this layer is a resume point (the cadence keeps saving under a tenth of the run)
            def gather(local: list[torch.Tensor]) -> list[torch.Tensor] | None:
                dtype = collective.broadcast_object(local[0].dtype if local else None)
                return collective.gather_to_main(local, [[sample_shapes[i] for i in share] for share in shares], dtype, run.store.device)

            # the weights on the host now: the save thread then holds no GPU memory while the next layer is worked on
            # (queued copies into pinned memory: the save's thread waits for them, this one goes on)
            write = None if state is None else functools.partial(
                state.save_layer, index, {prefix + name: saved_form(qw, non_blocking=True) for name, qw in layer_quantized.items()})
            cadence.save(index, num_layers, next_hidden, write, writer, hidden_bytes=tensors_bytes(next_hidden) * collective.world_size,
                         agree=lambda due: collective.broadcast_object(due if collective.is_main else None), gather=gather)
            del original, restore, layer_quantized, layer
            float_model.release_layer(index)
            inputs = inputs.advanced(next_hidden)
            del next_hidden, write  # the next layer's inputs only: a rung that moves them to the host frees them
            give_back_freed_memory()  # what the layer's work freed
            report(index + 1, num_layers, f"layer {index + 1}/{num_layers}")
        writer.wait()  # every layer saved before the checkpoint reads them

        peak = torch.tensor([float(peak_memory_bytes(compute))], dtype=torch.float64)
        collective.max_(peak)  # the largest of the processes' peaks
        host_peak = torch.tensor([float(peak_host_memory_bytes())], dtype=torch.float64)
        collective.max_(host_peak)
        if state is None:
            return None
        # Every layer's weights come from the saved state, so a resumed run writes what an uninterrupted one would; they
        # are read one layer at a time while the checkpoint is written.
        quantized = SavedWeights(state, range(num_layers), state.load_layer)
        result = job.write_checkpoint(quantized, skipped, modules, calibration_tokens, compute_dtype, resumed_from, peak=int(peak.item()),
                                      host_peak=int(host_peak.item()))
        state.remove()
        return result
