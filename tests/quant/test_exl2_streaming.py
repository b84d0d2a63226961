"""EXL2 quantization with the float weights streamed from their files writes the bytes of the whole-model path,
from sharded safetensors and from GGUF, with the activations (the weighing pass's too) on each tier and after
running out of (simulated) GPU memory inside a layer of any pass; while it runs only the layer at work holds its
weights; the memory estimate, the weighing pass's share included, is reported before the run and the peaks after;
and the final write reads each saved layer once (GPTQ too)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

import pytest
import torch

from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.quant.exl2_pipeline import quantize_model_exl2
from qtool.quant.work_state import WorkState

from streamed_sources import block_quantized_gguf, files_of, live_model_ids, resident_layers, write_sharded

LAYERS = 3
SAMPLES, SEQLEN = 4, 32
SHARD_BYTES = 25_000  # the output in several shards
TINY = dict(num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # the machine is shared: tiny matmuls lose to thread hand-offs (and every run of a comparison uses the same count)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_llama, make_tiny_tokenizer, make_calibration_text):
    root = tmp_path_factory.mktemp("exl2stream")
    source = write_sharded(root / "model", make_tiny_llama(5, **TINY), make_tiny_tokenizer(), torch.float16)
    calibration = make_calibration_text(root / "calibration.txt")
    config = QuantConfig(output_format="exl2", bpw=4.0, head_bits=6,
                         calibration=CalibrationConfig(source=str(calibration), samples=SAMPLES, seqlen=SEQLEN, seed=2))
    whole = quantize_model_exl2(source, config, root / "whole", device="cpu", streaming=False, max_shard_size_bytes=SHARD_BYTES)
    return root, source, config, whole


class LayerForwards:
    """Wraps run_layer_batch where the pipeline, the layer runner and the weighing pass call it: records each call's
    layer and tokens, and raises torch.OutOfMemoryError as a GPU would for calls over `cap_tokens` (while armed)."""

    def __init__(self, monkeypatch, model_type: type | None = None, cap_tokens: int | None = None, fail_calls: set[int] = frozenset()):
        from qtool.models import layerwise

        self.real = layerwise.run_layer_batch
        self.model_type, self.cap_tokens, self.fail_calls = model_type, cap_tokens, set(fail_calls)
        self.earlier = live_model_ids(model_type) if model_type else frozenset()
        self.calls: list[tuple[int, int, set[int]]] = []  # (layer, tokens, resident layers)
        self.raised = 0
        self.armed = True  # whether the cap applies now
        for module in ("qtool.models.layerwise", "qtool.quant.exl2_pipeline", "qtool.quant.sensitivity"):
            monkeypatch.setattr(f"{module}.run_layer_batch", self)

    def __call__(self, layer, inputs, samples, **kwargs):
        tokens = sum(inputs.hidden_states[i].shape[0] * inputs.hidden_states[i].shape[1] for i in samples)
        resident = resident_layers(self.model_type, self.earlier) if self.model_type else set()
        self.calls.append((inputs.layer_index, tokens, resident))
        if (self.armed and self.cap_tokens is not None and tokens > self.cap_tokens) or len(self.calls) in self.fail_calls:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (a test's cap: {tokens} tokens in one call)")
        return self.real(layer, inputs, samples, **kwargs)


class StepReads:
    """Counts the reads of each saved step's file (WorkState.load_step)."""

    def __init__(self, monkeypatch):
        self.reads: Counter = Counter()
        real = WorkState.load_step

        def load_step(state, index):
            self.reads[index] += 1
            return real(state, index)

        monkeypatch.setattr(WorkState, "load_step", load_step)


def test_streamed_run_writes_the_whole_models_bytes_holding_one_layer(setup, monkeypatch):
    from transformers import LlamaForCausalLM

    from qtool.models.rules import ModelStats, estimate_peak_memory, validate_for_hardware

    root, source, config, whole = setup
    forwards = LayerForwards(monkeypatch, LlamaForCausalLM)
    reads = StepReads(monkeypatch)
    seen: list[str] = []
    streamed = quantize_model_exl2(source, config, root / "streamed", device="cpu", max_shard_size_bytes=SHARD_BYTES,
                                   progress=lambda done, total, detail="": seen.append(detail))  # streaming: the default
    written = files_of(root / "streamed")
    assert written == files_of(root / "whole")
    assert sum(name.endswith(".safetensors") for name in written) > 2 and "model.safetensors.index.json" in written
    assert streamed.errors == whole.errors and streamed.quantized_linears == whole.quantized_linears == 7 * LAYERS + 1
    # every layer forward (weighing forward and backward, measuring, quantizing) ran with that layer alone in memory
    assert {layer for layer, _, _ in forwards.calls} == set(range(LAYERS))
    assert all(resident == {layer} for layer, _, resident in forwards.calls), forwards.calls
    # the write read each quantized layer's saved step once (steps: weighing, 3 measured, 3 quantized)
    assert reads.reads == Counter({4: 1, 5: 1, 6: 1})
    # the estimate, said before any layer's work, is the one validate judges; the peaks are measured after
    estimate = streamed.memory["estimate"]
    assert estimate["streaming"] and not whole.memory["estimate"]["streaming"]
    first_work = next(i for i, detail in enumerate(seen) if detail.startswith(("weighing", "measuring")))
    assert any(detail.startswith("estimated peak memory") and "streamed layer by layer" in detail
               and detail.endswith("the weighing pass's layer inputs in host memory") for detail in seen[:first_work])
    from qtool.checkpoints.sources import load_model

    stats = ModelStats.from_config(load_model(str(source), with_tokenizer=False).model.config)
    expected = estimate_peak_memory(config, stats, "cpu", streaming=True)
    assert streamed.estimated_peak_memory_bytes == expected["cpu_bytes"] == estimate["cpu_bytes"] > 0
    assert expected["components"]["recordings"] == 0 and not expected["replay"]  # EXL2 has no replay
    assert expected["components"]["weighing"] == SAMPLES * SEQLEN * stats.hidden * 4 * (LAYERS + 2)
    assert expected["components"]["weighing_head"] == SEQLEN * stats.vocab * 4 * 3 and stats.vocab == 320
    assert expected["weighing_tier"] == "host" and expected["cpu_bytes"] >= expected["components"]["weights"] + expected["components"]["weighing"]
    assert estimate_peak_memory(config, stats, "cpu", streaming=True, weighing=False)["components"]["weighing"] == 0
    (fits,) = validate_for_hardware(config, stats, "cpu", cpu_free_bytes=expected["cpu_bytes"], streaming=True)
    (short,) = validate_for_hardware(config, stats, "cpu", cpu_free_bytes=estimate_peak_memory(config, stats, "cpu", streaming=True,
                                                                                                cpu_free_bytes=0)["cpu_bytes"] - 1, streaming=True)
    assert fits.level.name == "INFO" and short.level.name == "ERROR"
    assert streamed.memory["peak_host_bytes"] > 0 and streamed.peak_memory_bytes >= streamed.memory["peak_host_bytes"]


def test_disk_tier_writes_the_same_bytes(setup):
    root, source, config, whole = setup
    folders: dict[str, dict[str, list[str]]] = {}

    def watch(done: int, total: int, detail: str = "") -> None:
        if detail in ("weighing: loss gradients", "capturing calibration inputs"):
            folders[detail] = {folder.name: sorted(f.name for f in folder.iterdir()) for folder in root.glob(".disk.activations-*")}

    result = quantize_model_exl2(source, config, root / "disk", device="cpu", activation_tier="disk", max_shard_size_bytes=SHARD_BYTES,
                                 progress=watch)
    estimate = result.memory["estimate"]
    assert (estimate["activation_tier"], estimate["weighing_tier"]) == ("disk", "disk")
    assert (whole.memory["estimate"]["activation_tier"], whole.memory["estimate"]["weighing_tier"]) == ("host", "host")
    # the weighing pass kept every layer's inputs and the last layer's outputs on disk, in a folder of its own beside
    # the passes' (one file per generation: the folder shows the newest), gone once the pass is done
    assert sorted(folders["weighing: loss gradients"].values()) == [[], [f"activations-{LAYERS + 1:05d}.bin"]]
    assert list(folders["capturing calibration inputs"].values()) == [[]]
    assert files_of(root / "disk") == files_of(root / "whole")  # measurement.json holds the sensitivities
    assert not list(root.glob(".*activations-*"))


def test_out_of_memory_in_every_batched_forward_redoes_layers_one_sample_at_a_time(setup, monkeypatch, caplog):
    root, source, config, whole = setup
    forwards = LayerForwards(monkeypatch, cap_tokens=SEQLEN)  # more than one sample per forward "does not fit"
    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        quantize_model_exl2(source, config, root / "capped", device="cpu", max_shard_size_bytes=SHARD_BYTES)
    # each pass starts as planned and stays on the rung that fits: the weighing pass, then the measuring and
    # quantizing passes (one ladder)
    assert [r.getMessage() for r in caplog.records] == [
        f"weighing: forward through layer 1/{LAYERS}: out of GPU memory as planned; redoing it with one sample per batch",
        f"measuring layer 1/{LAYERS}: out of GPU memory as planned; redoing it with one sample per batch"]
    assert forwards.raised == 2
    assert files_of(root / "capped") == files_of(root / "whole")


def test_out_of_memory_midway_through_a_layer_restores_it_first(setup, monkeypatch, caplog):
    root, source, config, _ = setup
    measurement = root / "whole" / "measurement.json"  # with sensitivities: only the quantization pass runs
    reference = quantize_model_exl2(source, config, root / "reused", device="cpu", measurement=measurement, max_shard_size_bytes=SHARD_BYTES)
    # layer 2's second group (o_proj): its first group's weights are already quantized when memory runs out
    forwards = LayerForwards(monkeypatch)
    quantize_model_exl2(source, config, root / "probe", device="cpu", measurement=measurement, max_shard_size_bytes=SHARD_BYTES)
    layer_calls = [i + 1 for i, (layer, _, _) in enumerate(forwards.calls) if layer == 1]
    monkeypatch.undo()
    LayerForwards(monkeypatch, fail_calls={layer_calls[1]})
    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        again = quantize_model_exl2(source, config, root / "squeezed", device="cpu", measurement=measurement, max_shard_size_bytes=SHARD_BYTES)
    assert [r.getMessage() for r in caplog.records] == [f"quantizing layer 2/{LAYERS}: out of GPU memory as planned; redoing it with one sample per batch"]
    assert files_of(root / "squeezed") == files_of(root / "reused") and again.errors == reference.errors


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_streamed_and_whole_write_the_same_bytes(setup, make_tiny_llama, make_tiny_tokenizer, tied):
    root, _, config, _ = setup
    model = make_tiny_llama(8, tie_word_embeddings=tied, **TINY)
    if tied:
        del model.lm_head  # llama.cpp writes no output tensor for a tied head (the quantized head unties it)
    path = block_quantized_gguf(root / f"tiny-{tied}.gguf", model, make_tiny_tokenizer())
    # a measurement of the other model's linears (the same names) without its sensitivities: the weighing pass runs
    measurement = json.loads((root / "whole" / "measurement.json").read_text())
    for entry in measurement["linears"].values():
        del entry["sensitivity"]
    (root / "unweighed.json").write_text(json.dumps(measurement))
    runs = {streaming: quantize_model_exl2(str(path), config, root / f"gguf-{tied}-{streaming}", device="cpu", streaming=streaming,
                                           measurement=root / "unweighed.json") for streaming in (False, None)}
    assert runs[None].weighed and runs[None].memory["estimate"]["streaming"] and not runs[False].memory["estimate"]["streaming"]
    assert files_of(root / f"gguf-{tied}-None") == files_of(root / f"gguf-{tied}-False")
    assert json.loads((root / f"gguf-{tied}-None" / "config.json").read_text())["tie_word_embeddings"] is False


def test_gptq_write_reads_each_saved_layer_once(setup, monkeypatch):
    from qtool.quant.pipeline import quantize_model

    root, source, config, _ = setup
    reads = StepReads(monkeypatch)
    gptq = dataclasses.replace(config, output_format="gptq", bits=4, group_size=32, head_bits=0)
    quantize_model(str(source), gptq, root / "gptq", device="cpu", max_shard_size_bytes=SHARD_BYTES)
    assert reads.reads == Counter({index: 1 for index in range(LAYERS)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_tier_writes_the_same_bytes_on_the_gpu(setup):
    root, source, config, _ = setup
    for tier in ("device", "host", "disk"):
        result = quantize_model_exl2(source, config, root / f"gpu-{tier}", device="cuda", activation_tier=tier)
        estimate = result.memory["estimate"]
        assert estimate["activation_tier"] == estimate["weighing_tier"] == tier and result.memory["peak_device_bytes"] > 0
    reference = files_of(root / "gpu-device")
    assert files_of(root / "gpu-host") == reference and files_of(root / "gpu-disk") == reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_weighing_pass_and_the_head_go_down_to_host_memory_and_the_cpu_on_the_gpu(setup, monkeypatch, caplog):
    """On a GPU every rung is there: two failed tries of layer 2's weighing forward take the weighing pass (its
    kept inputs on the GPU) to host memory, a failing head quantization takes the run to the CPU. A GPU library
    may pick other kernels for other batch shapes, so the sensitivities are compared to float32 accuracy."""
    root, source, config, _ = setup
    reference = quantize_model_exl2(source, config, root / "gpu-free", device="cuda", activation_tier="device")
    forwards = LayerForwards(monkeypatch)
    quantize_model_exl2(source, config, root / "gpu-probe", device="cuda", activation_tier="device")
    layer_2 = next(i + 1 for i, (layer, _, _) in enumerate(forwards.calls) if layer == 1)
    monkeypatch.undo()
    LayerForwards(monkeypatch, fail_calls={layer_2, layer_2 + 1})
    import qtool.quant.exl2_pipeline as pipeline

    real_head, head_tries = pipeline._quantize_head, []

    def head_out_of_memory(model, inputs, head_bits, device, refine=False):
        head_tries.append(str(device))
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory (a test's head)")
        return real_head(model, inputs, head_bits, device, refine)

    monkeypatch.setattr(pipeline, "_quantize_head", head_out_of_memory)
    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        squeezed = quantize_model_exl2(source, config, root / "gpu-squeezed", device="cuda", activation_tier="device")
    assert [r.getMessage() for r in caplog.records] == [
        f"weighing: forward through layer 2/{LAYERS}: out of GPU memory as planned; redoing it with one sample per batch",
        f"weighing: forward through layer 2/{LAYERS}: out of GPU memory with one sample per batch; redoing it with the activations in host memory",
        "quantizing the head: out of GPU memory as planned; redoing it with the activations in host memory",
        "quantizing the head: out of GPU memory with the activations in host memory; redoing it on the CPU"]
    assert head_tries == ["cuda", "cuda", "cpu"]
    want = {name: entry["sensitivity"] for name, entry in json.loads((root / "gpu-free" / "measurement.json").read_text())["linears"].items()}
    got = {name: entry["sensitivity"] for name, entry in json.loads((root / "gpu-squeezed" / "measurement.json").read_text())["linears"].items()}
    assert got.keys() == want.keys() and all(got[n] == pytest.approx(want[n], rel=1e-4) for n in want)
    assert squeezed.quantized_linears == reference.quantized_linears


def test_bfloat16_weights_held_in_the_forward_dtype_write_the_same_bytes_after_a_redo(setup, make_tiny_llama, make_tiny_tokenizer, monkeypatch):
    """A bfloat16 model with bfloat16 forwards: its weights are kept in bfloat16 while a layer is worked on (no cast
    per forward call); streamed with an out-of-memory redo midway through a quantized layer it writes the bytes of
    the whole model's uninterrupted run."""
    root, _, config, _ = setup
    source = write_sharded(root / "model-bf16", make_tiny_llama(6, **TINY), make_tiny_tokenizer(), torch.bfloat16)
    config = dataclasses.replace(config, compute_dtype="bfloat16")
    whole = quantize_model_exl2(source, config, root / "bf16-whole", device="cpu", streaming=False, max_shard_size_bytes=SHARD_BYTES)
    forwards = LayerForwards(monkeypatch)
    quantize_model_exl2(source, config, root / "bf16-probe", device="cpu", measurement=root / "bf16-whole" / "measurement.json",
                        max_shard_size_bytes=SHARD_BYTES)
    second_layer = [i + 1 for i, (layer, _, _) in enumerate(forwards.calls) if layer == 1]
    monkeypatch.undo()
    failing = LayerForwards(monkeypatch, fail_calls={second_layer[1]})
    again = quantize_model_exl2(source, config, root / "bf16-redone", device="cpu", measurement=root / "bf16-whole" / "measurement.json",
                                max_shard_size_bytes=SHARD_BYTES)
    assert failing.raised == 1
    assert files_of(root / "bf16-redone") == files_of(root / "bf16-whole") and again.errors == whole.errors
