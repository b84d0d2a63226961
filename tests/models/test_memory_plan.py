"""The memory estimate's plan: streamed weights count the parts outside the decoder layers and one layer (twice:
the copy kept to redo it), and the activations go to the first place that fits the free memory given, from the
GPU with the replay down to files on disk; validate's rule judges the plan chosen and its fix names sizes whose
estimate fits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.core.findings import Level
from qtool.models.rules import ModelStats, estimate_peak_memory, validate_for_hardware

GiB = 2**30


def llama_like(layers: int = 7, hidden: int = 320, intermediate: int = 864, vocab: int = 5003) -> ModelStats:
    """Stats of an odd-sized gated model, counted the way a reader would by hand."""
    layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return ModelStats(params=layers * layer + 2 * vocab * hidden + hidden, layers=layers, hidden=hidden, intermediate=intermediate,
                      heads=5, max_in_features=intermediate, layer_params=layer, layer_outputs=4 * hidden + 2 * intermediate + hidden,
                      largest_group_params=2 * hidden * intermediate)


def config(samples: int = 37, seqlen: int = 211) -> QuantConfig:
    return replace(QuantConfig(calibration=CalibrationConfig(source="wikitext", samples=samples, seqlen=seqlen)))


def test_streamed_weights_are_the_outside_and_one_layer_twice():
    stats = llama_like()
    whole = estimate_peak_memory(config(), stats, "cpu")
    streamed = estimate_peak_memory(config(), stats, "cpu", streaming=True)
    outside = (2 * 5003 * 320 + 320) * 4
    assert streamed["components"]["weights"] == outside + 2 * stats.layer_params * 4
    assert whole["components"]["weights"] == stats.params * 4
    assert whole["cpu_bytes"] - streamed["cpu_bytes"] == (stats.layers - 2) * stats.layer_params * 4


def plan_of(estimate: dict) -> tuple[str, str]:
    return estimate["activation_tier"], "all" if estimate["replay"] else "blocks" if estimate["replay_blocks"] else "none"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plans_step_down_as_free_memory_shrinks(device):
    stats, job = llama_like(), config()
    tokens = 37 * 211
    activations, recordings = tokens * 2 * 320 * 4, tokens * (stats.layer_outputs + 4 * 320) * 4
    roomy = estimate_peak_memory(job, stats, device, streaming=True)
    first = "device" if device == "cuda" else "host"
    assert plan_of(roomy) == (first, "all")
    assert roomy["components"]["activations"] == activations and roomy["components"]["recordings"] == recordings
    assert roomy["components"]["block_recordings"] == activations // 2  # one hidden-sized copy
    pool = "device_bytes" if device == "cuda" else "cpu_bytes"
    other = "cpu_bytes" if device == "cuda" else "device_bytes"
    seen = [plan_of(roomy)]
    # one byte short of each plan: the next one
    free = roomy[pool] - 1
    while True:
        kwargs = {"device_free_bytes": free} if device == "cuda" else {"cpu_free_bytes": free}
        plan = estimate_peak_memory(job, stats, device, streaming=True, **kwargs)
        if plan_of(plan) == seen[-1]:
            break
        seen.append(plan_of(plan))
        if plan[pool] > free:
            break
        free = plan[pool] - 1
    if device == "cuda":
        # the GPU runs out: first the lean replay there, then none, then the activations leave it (the host has room)
        assert seen[:4] == [("device", "all"), ("device", "blocks"), ("device", "none"), ("host", "all")]
    else:
        assert seen == [("host", "all"), ("host", "blocks"), ("host", "none"), ("disk", "none")]
        disk = estimate_peak_memory(job, stats, device, streaming=True, cpu_free_bytes=0)
        assert disk["disk_bytes"] == activations and disk["cpu_bytes"] == roomy["cpu_bytes"] - recordings - activations // 2
    assert roomy[other] >= 0


def test_validate_takes_the_plan_that_fits_and_its_fix_fits():
    stats, job = llama_like(), config(samples=301, seqlen=1031)
    disk = estimate_peak_memory(job, stats, "cpu", streaming=True, cpu_free_bytes=0)
    (fits,) = validate_for_hardware(job, stats, "cpu", cpu_free_bytes=disk["cpu_bytes"], streaming=True)
    assert fits.level is Level.INFO and fits.message.endswith("(activations on disk, no replay)")
    free = disk["cpu_bytes"] - 12345
    (short,) = validate_for_hardware(job, stats, "cpu", cpu_free_bytes=free, streaming=True)
    assert short.level is Level.ERROR
    options = dict(part.split(" ") for part in short.fix.removeprefix("use ").split(" or ") if part.startswith("--"))
    samples, seqlen = int(options["--samples"]), int(options["--seqlen"])

    def cpu(samples: int, seqlen: int) -> int:
        return estimate_peak_memory(config(samples, seqlen), stats, "cpu", streaming=True, cpu_free_bytes=free)["cpu_bytes"]

    assert cpu(samples, 1031) <= free < cpu(samples + 1, 1031)
    assert cpu(301, seqlen) <= free < cpu(301, seqlen + 1)


def test_several_processes_split_the_samples_and_each_holds_the_weights():
    stats = llama_like()
    two = estimate_peak_memory(config(samples=37), stats, torch.device("cuda"), processes=2, streaming=True)
    one = estimate_peak_memory(config(samples=19), stats, torch.device("cuda"), streaming=True)
    assert two["device_bytes"] == one["device_bytes"] and two["cpu_bytes"] == 2 * one["cpu_bytes"]


def exl2(samples: int = 37, seqlen: int = 211, head_bits: int = 0) -> QuantConfig:
    return replace(config(samples, seqlen), output_format="exl2", bpw=4.0, head_bits=head_bits)


def test_the_weighing_pass_takes_the_first_tier_that_fits_on_its_own():
    stats, job = replace(llama_like(), vocab=5003), exl2()
    gptq = estimate_peak_memory(config(), stats, "cuda")
    assert gptq["weighing_tier"] is None and gptq["weighing_peaks"] is None  # GPTQ has no weighing pass
    # 32 windows (of the 37 samples): every layer's inputs, the last layer's outputs and the gradients
    window_bytes = 32 * 211 * 320 * 4
    # the layer, its widest Hessian (larger than gate+up's three float32 copies here), its uint8 codes, the scratch
    work = stats.layer_params * 4 + max(864 * 864 * 4 * 4, 2 * 320 * 864 * 4 * 3) + stats.layer_params + 211 * max(2 * 864, 5 * 211) * 4
    at_head = 5003 * 320 * 4 + 211 * 5003 * 4 * 3  # the head's weights, one window's logits (three copies)
    passes = work + 37 * 211 * 320 * 4 * 2  # a layer's inputs and outputs on the GPU
    weights = estimate_peak_memory(job, stats, "cuda", streaming=True)["components"]["weights"]

    roomy = estimate_peak_memory(job, stats, "cuda", streaming=True)
    assert roomy["components"]["weighing"] == window_bytes * 9
    assert (roomy["activation_tier"], roomy["weighing_tier"]) == ("device", "device")
    assert roomy["device_bytes"] == max(work, at_head) + window_bytes * 9 > passes and roomy["cpu_bytes"] == weights
    # a GPU with room for the passes only: the weighing pass's inputs wait in host memory, the passes stay
    gpu = estimate_peak_memory(job, stats, "cuda", streaming=True, device_free_bytes=passes)
    assert (gpu["activation_tier"], gpu["weighing_tier"]) == ("device", "host")
    assert gpu["device_bytes"] == passes and gpu["cpu_bytes"] == weights + window_bytes * 9
    # and a host without room for them: on disk, all but the gradients
    both = estimate_peak_memory(job, stats, "cuda", streaming=True, device_free_bytes=passes, cpu_free_bytes=weights + window_bytes)
    assert (both["activation_tier"], both["weighing_tier"]) == ("device", "disk")
    assert both["disk_bytes"] == window_bytes * 8 and both["cpu_bytes"] == weights + window_bytes
    # the pass's own peaks, beside the run's
    assert roomy["weighing_peaks"] == {"cpu_bytes": weights, "device_bytes": roomy["device_bytes"], "disk_bytes": 0}
    assert both["weighing_peaks"] == {"cpu_bytes": weights + window_bytes, "device_bytes": max(work, at_head), "disk_bytes": window_bytes * 8}
    (fits,) = [f for f in validate_for_hardware(job, stats, "cuda", cpu_free_bytes=weights + window_bytes, device_free_bytes=passes,
                                                streaming=True) if f.where == "memory (cpu)"]
    assert fits.level is Level.INFO and fits.message.endswith("the weighing pass's layer inputs on disk)")
    # a tier asked for holds for both
    host = estimate_peak_memory(job, stats, "cuda", streaming=True, tier="host")
    assert (host["activation_tier"], host["weighing_tier"]) == ("host", "host")


def test_a_quantized_head_counts_its_solve_where_it_runs():
    stats = replace(llama_like(), vocab=5003)
    plain, quantized = (estimate_peak_memory(exl2(head_bits=bits), stats, "cuda", weighing=False) for bits in (0, 6))
    head = 5003 * 320 * 4
    assert plain["components"]["head"] == 0 and quantized["components"]["head"] == head
    assert quantized["components"]["head_quantization"] == head * 5 + 320 * 320 * 4 * 4
    assert quantized["device_bytes"] - plain["device_bytes"] == head * 6 + 320 * 320 * 4 * 4 - (stats.layer_params * 4 + 864 * 864 * 4 * 4
                                                                                                 + stats.layer_params + 211 * max(2 * 864, 5 * 211) * 4)


def test_a_70b_weighing_pass_goes_to_disk_while_the_passes_stay_on_the_gpu():
    """Issue 26's case: a Llama-2-70B shape (SmolLM2's vocabulary, as bench/quantize/big_model.py writes it) with
    the bench's calibration (128 x 2048) on an 80 GiB GPU and 128 GiB of host memory: the weighing pass's 32
    windows x 82 hidden states are 164 GiB, more than the host holds."""
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                     vocab_size=49152, tie_word_embeddings=False)
    stats = ModelStats.from_config(hf)
    job = exl2(samples=128, seqlen=2048)
    plan = estimate_peak_memory(job, stats, "cuda", streaming=True, cpu_free_bytes=128 * GiB, device_free_bytes=80 * GiB)
    assert plan["components"]["weighing"] == 164 * GiB  # 2 GiB per layer's inputs (32 x 2048 x 8192 float32)
    assert (plan["activation_tier"], plan["weighing_tier"]) == ("device", "disk")
    assert plan["disk_bytes"] == 162 * GiB and plan["cpu_bytes"] <= 128 * GiB and plan["device_bytes"] <= 80 * GiB
    with_host = estimate_peak_memory(job, stats, "cuda", streaming=True, tier="host")
    assert with_host["cpu_bytes"] > 164 * GiB  # what keeping them in host memory, as before, would take
