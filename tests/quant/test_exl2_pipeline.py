"""EXL2 quantization of a tiny random Llama end to end: the target bpw is met, the checkpoint loads (through
load_model) and computes what the returned weights say, measurement.json is written and reused for another
target without measuring again, an interrupted run resumes to the same bytes, --target-vram picks a bpw that
fits, and bad requests fail before any work."""

import dataclasses
import json

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.config.schema import CalibrationConfig, QuantConfig
from qtool.checkpoints.exl2_checkpoint import exl2_weights_of, load_exl2_model
from qtool.quant.exl2_pipeline import quantize_model_exl2
from qtool.quant.work_state import WorkState
from qtool.checkpoints.sources import load_model


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_model_dir, make_calibration_text):
    root = tmp_path_factory.mktemp("exl2pipe")
    make_tiny_model_dir(root / "float", seed=3, hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4)
    text = make_calibration_text(root / "calib.txt")
    config = QuantConfig(output_format="exl2", desc_act=True, calibration=CalibrationConfig(source=str(text), samples=4, seqlen=32, seed=0))
    return root, config


def exl2_config(config: QuantConfig, **changes) -> QuantConfig:
    return dataclasses.replace(config, **changes)


def q45(root, config):
    out = root / "q45"
    if not out.exists():  # shared by the tests of this module, whichever runs first
        quantize_model_exl2(root / "float", exl2_config(config, bpw=4.5, head_bits=6), out, device="cpu")
    return out


def test_quantize_meets_target_and_loads(setup):
    root, config = setup
    result = quantize_model_exl2(root / "float", exl2_config(config, bpw=4.5, head_bits=6), root / "q45-fresh", device="cpu")
    assert result.measured and result.resumed_from_step == 0
    assert abs(result.bits_per_weight - 4.5) <= 0.02
    loaded = load_model(root / "q45-fresh", device="cpu", dtype="float32")
    qconfig = loaded.quantization_config
    assert qconfig["quant_method"] == "exl2" and qconfig["bits"] == 4.5 and qconfig["head_bits"] == 6
    weights = exl2_weights_of(loaded.model)
    assert "lm_head" in weights and len(weights) == 15
    measured_bits = sum(w.storage_bits() for n, w in weights.items() if n != "lm_head")
    measured_weights = sum(w.in_features * w.out_features for n, w in weights.items() if n != "lm_head")
    assert measured_bits / measured_weights == pytest.approx(result.bits_per_weight)
    # the file computes what its weights say: a float copy holding them gives the same logits
    float_model = load_model(root / "float", device="cpu", dtype="float32").model
    with torch.no_grad():
        for param in float_model.parameters():
            param.copy_(param.half().float())  # the checkpoint stores float tensors as float16
        for name, w in weights.items():
            float_model.get_submodule(name).weight = torch.nn.Parameter(w.dequantize())
        ids = torch.tensor([[0, 5, 17, 33, 80, 120, 7, 250]])
        torch.testing.assert_close(loaded.model(ids).logits, float_model(ids).logits, rtol=1e-5, atol=1e-5)
    # errors are relative output errors, small at 4.5 bpw
    assert all(0 <= e < 0.05 for e in result.errors.values())
    measurement = json.loads((root / "q45-fresh" / "measurement.json").read_text())
    assert measurement["version"] == 1 and len(measurement["linears"]) == 14


def test_measurement_reused_for_another_target(setup):
    root, config = setup
    high_dir = q45(root, config)
    result = quantize_model_exl2(root / "float", exl2_config(config, bpw=3.0), root / "q3", device="cpu", measurement=high_dir / "measurement.json")
    assert not result.measured and not result.weighed and abs(result.bits_per_weight - 3.0) <= 0.02
    # a measurement written before sensitivities were kept is weighed again, to the same allocation and bytes
    measurement = json.loads((high_dir / "measurement.json").read_text())
    assert all(entry["sensitivity"] > 0 for entry in measurement["linears"].values())
    for entry in measurement["linears"].values():
        del entry["sensitivity"]
    (root / "old-measurement.json").write_text(json.dumps(measurement))
    again = quantize_model_exl2(root / "float", exl2_config(config, bpw=3.0), root / "q3-old", device="cpu", measurement=root / "old-measurement.json")
    assert again.weighed and again.choices == result.choices
    assert checkpoint_bytes(root / "q3-old") == checkpoint_bytes(root / "q3")
    low = exl2_weights_of(load_exl2_model(root / "q3", dtype=torch.float32))
    high = exl2_weights_of(load_exl2_model(high_dir, dtype=torch.float32))
    assert sum(w.code_bits() for w in low.values()) < sum(w.code_bits() for n, w in high.items() if n != "lm_head")


def checkpoint_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))} | {"measurement.json": (directory / "measurement.json").read_bytes()}


@pytest.mark.parametrize("stop_at", ["measuring layer 1/2", "measuring layer 2/2", "quantizing layer 2/2"])
def test_interrupted_run_resumes_to_the_same_bytes(setup, stop_at):
    root, config = setup
    job = exl2_config(config, bpw=3.5)
    reference = root / "resume-reference"
    if not reference.exists():
        quantize_model_exl2(root / "float", job, reference, device="cpu")
    out = root / f"resumed-{stop_at.split()[0]}-{stop_at.split()[2][0]}"

    def stop(done, total, detail=""):
        if detail == stop_at:
            raise Interrupted(detail)

    with pytest.raises(Interrupted):
        quantize_model_exl2(root / "float", job, out, device="cpu", progress=stop)
    assert not out.exists()
    saved = json.loads((WorkState.folder_for(out) / "job.json").read_text())["completed_layers"]
    # steps: weigh the linears, measure 2 layers, then quantize 2
    assert saved == {"measuring layer 1/2": 1, "measuring layer 2/2": 2, "quantizing layer 2/2": 4}[stop_at]
    result = quantize_model_exl2(root / "float", job, out, device="cpu")
    assert result.resumed_from_step == saved
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)
    assert not WorkState.folder_for(out).exists()


def test_large_hidden_states_are_resume_points_only_at_the_cadence(tmp_path, make_tiny_model_dir, make_calibration_text,
                                                                     monkeypatch):
    """Hidden states counted as large (work_state.HIDDEN_SAVED_EVERY_STEP_BYTES) are saved at the first step and
    the last of each pass only, with an overhead ratio out of reach: stopped before measuring layer 3 of 3, the run
    resumes after layer 1's measurement (the steps written since are redone) and writes the same bytes."""
    import qtool.quant.work_state as work_state

    model_dir = make_tiny_model_dir(tmp_path / "float", seed=5, num_hidden_layers=3, hidden_size=128,
                                    intermediate_size=256, head_dim=32, num_attention_heads=4)
    text = make_calibration_text(tmp_path / "calib.txt")
    job = QuantConfig(output_format="exl2", desc_act=True, bpw=3.5,
                      calibration=CalibrationConfig(source=str(text), samples=4, seqlen=32, seed=0))
    reference = tmp_path / "reference"
    quantize_model_exl2(model_dir, job, reference, device="cpu")
    monkeypatch.setattr(work_state, "HIDDEN_SAVED_EVERY_STEP_BYTES", 0)
    monkeypatch.setattr(work_state, "SAVE_OVERHEAD_RATIO", 1e9)
    monkeypatch.setattr(work_state, "ASSUMED_SAVE_BYTES_PER_SECOND", float("inf"))  # the first step: a resume point
    out = tmp_path / "resumed"

    def stop(done, total, detail=""):
        if detail == "measuring layer 3/3":
            raise Interrupted(detail)

    with pytest.raises(Interrupted):
        quantize_model_exl2(model_dir, job, out, device="cpu", progress=stop)
    # steps: weigh, measure layers 1-3, quantize layers 1-3; measuring layer 2 wrote its result, no resume point
    assert json.loads((WorkState.folder_for(out) / "job.json").read_text())["completed_layers"] == 2
    assert (WorkState.folder_for(out) / "layer-0002.safetensors").is_file()
    result = quantize_model_exl2(model_dir, job, out, device="cpu")
    assert result.resumed_from_step == 2
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def test_target_vram_picks_the_bpw_that_fits(setup):
    root, config = setup
    float_model = load_model(root / "float", device="cpu", dtype="float32").model
    cfg = float_model.config
    linears = {n: m for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    quantized_weights = sum(m.weight.numel() for m in linears.values())
    fixed = sum(p.numel() for n, p in float_model.named_parameters() if n.removesuffix(".weight") not in linears) * 2
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 64 * 2  # keys and values, float16
    scratch = 64 * cfg.vocab_size * 4 + 64 * cfg.intermediate_size * 3 * 2
    budget_bytes = fixed + kv + scratch + quantized_weights * 3.6 / 8  # room for 3.6 bpw
    result = quantize_model_exl2(
        root / "float", exl2_config(config, target_vram_gb=budget_bytes / 1e9, context_length=64), root / "vram", device="cpu",
        measurement=q45(root, config) / "measurement.json",
    )
    assert result.vram_plan["bpw"] == pytest.approx(3.6, abs=0.011)
    assert result.config.bpw == pytest.approx(3.6, abs=0.011)
    assert result.bits_per_weight <= 3.6 + 0.02 and result.bits_per_weight >= 3.5
    used = fixed + kv + scratch + result.bits_per_weight * quantized_weights / 8
    assert used <= budget_bytes + 0.02 * quantized_weights / 8
    with pytest.raises(QtoolError, match="too small"):
        quantize_model_exl2(root / "float", exl2_config(config, target_vram_gb=(fixed + kv) / 1e9, context_length=64), root / "vram-small", device="cpu")
    assert not (root / "vram-small").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(bpw=9.0), "bpw: 9.0 is out of range"),
        (dict(head_bits=5), "head_bits: 5 is not valid"),
        (dict(method="rtn"), "cannot write EXL2"),
        (dict(output_format="gptq"), "not written by the EXL2 pipeline"),
    ],
)
def test_bad_requests(setup, changes, message):
    root, config = setup
    with pytest.raises(QtoolError, match=message):
        quantize_model_exl2(root / "float", exl2_config(config, **changes), root / "bad", device="cpu")
    assert not (root / "bad").exists()


def test_measurement_of_another_model_is_refused(setup, make_tiny_model_dir):
    root, config = setup
    other = make_tiny_model_dir(root / "other", seed=1, num_hidden_layers=1, hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4)
    with pytest.raises(QtoolError, match="does not match this model's linears"):
        quantize_model_exl2(other, exl2_config(config, bpw=4.0), root / "bad", device="cpu", measurement=q45(root, config) / "measurement.json")


def test_one_group_hessian_pass_stops_early_and_equals_the_full_pass(make_tiny_llama):
    """The quantization pass takes each group's Hessian from forwards stopped at that group's first linear: the
    same Hessian as a full forward gives, and nothing after that linear runs."""
    from qtool.quant.exl2_pipeline import _exl2_layout_check, _group_hessian, _group_hessians
    from qtool.quant.pipeline import split_quantizable
    from qtool.models.architectures import decoder_layers, get_architecture, resolve_layer_groups
    from qtool.models.layerwise import capture_layer_inputs

    model = make_tiny_llama(seed=4)
    spec = get_architecture(model)
    ids = [torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    inputs = capture_layer_inputs(model, ids, spec=spec)
    layer = decoder_layers(model, spec)[0]
    groups, _ = split_quantizable(resolve_layer_groups(model, 0, spec), _exl2_layout_check)
    down_calls = []
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: down_calls.append(1))
    try:
        for group in groups:
            before = len(down_calls)
            early = _group_hessian(layer, group, inputs, torch.device("cpu"))
            down_calls_while_early = len(down_calls) - before
            (full,), _ = _group_hessians(layer, [group], inputs, torch.device("cpu"))
            assert torch.equal(early, full) and bool(early.abs().sum() > 0)
            if not group[0][0].endswith("down_proj"):  # stopped before the MLP's last linear
                assert down_calls_while_early == 0, group[0][0]
        assert len(down_calls) > 0  # the full passes did reach it
    finally:
        handle.remove()


def test_the_measuring_and_quantizing_forwards_run_in_the_compute_dtype(setup, tmp_path):
    """config.compute_dtype reaches EXL2's measuring and quantizing passes (autocast: a linear's output is bfloat16
    there) and the result says which dtype ran; the target is still met."""
    root, config = setup
    import qtool.quant.exl2_pipeline as exl2_pipeline

    seen: dict[str, set] = {}
    measure, quantize = exl2_pipeline.measure_layer, exl2_pipeline.quantize_exl2_layer

    def watching(name, function):
        def run(layer, *args, **kwargs):
            linear = layer.self_attn.q_proj
            hook = linear.register_forward_hook(lambda m, a, out: seen.setdefault(name, set()).add(out.dtype))
            try:
                return function(layer, *args, **kwargs)
            finally:
                hook.remove()
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exl2_pipeline, "measure_layer", watching("measuring", measure))
        patch.setattr(exl2_pipeline, "quantize_exl2_layer", watching("quantizing", quantize))
        result = quantize_model_exl2(root / "float", exl2_config(config, bpw=4.0, compute_dtype="bfloat16"), tmp_path / "out",
                                     device="cpu")
    assert seen == {"measuring": {torch.bfloat16}, "quantizing": {torch.bfloat16}}
    assert result.compute_dtype == "bfloat16" and abs(result.bits_per_weight - 4.0) <= 0.02
