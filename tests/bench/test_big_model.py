"""bench/quantize/big_model.py on the CPU: the written model (shape, shards + index, the first N layers identical to
the full model's, loadable by transformers), per-layer times and the extrapolation from progress events, a stage
child's result, peak RSS and timeout, and the ratio in the table. The whole --tiny plan runs as a slow test."""

import json
import random
import statistics
import sys

import pytest
import torch
from safetensors.torch import load_file

from bench_scripts import BENCH, load_bench_script

WIKITEXT_VALID = BENCH.parents[1] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("quantize/big_model")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, make_tiny_tokenizer):
    directory = tmp_path_factory.mktemp("tokenizer")
    make_tiny_tokenizer().save_pretrained(str(directory))
    return directory


def read_model(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_written_model_holds_the_full_models_first_layers_in_capped_shards(bench, tokenizer_dir, tmp_path):
    from transformers import LlamaForCausalLM

    shape = bench.Shape(hidden=96, intermediate=160, layers=3, heads=6, kv_heads=2, max_positions=256)
    seed = random.randrange(1 << 30)
    cap = 60_000  # a few tensors a shard
    full = bench.write_model(shape, 3, tokenizer_dir, tmp_path / "full", "cpu", seed=seed, shard_bytes=cap)
    part = bench.write_model(shape, 2, tokenizer_dir, tmp_path / "part", "cpu", seed=seed, shard_bytes=cap)
    full_tensors, part_tensors = read_model(tmp_path / "full"), read_model(tmp_path / "part")

    expected = dict(bench.tensor_shapes(shape, 3, part["vocab"]))
    assert {name: tuple(t.shape) for name, t in full_tensors.items()} == expected
    assert all(t.dtype == torch.float16 for t in full_tensors.values())
    assert set(part_tensors) < set(full_tensors) and "model.layers.2.mlp.down_proj.weight" not in part_tensors
    for name, tensor in part_tensors.items():
        assert torch.equal(tensor, full_tensors[name]), name
    weight = full_tensors["model.layers.1.mlp.up_proj.weight"].double()
    assert weight.std().item() == pytest.approx(0.02, rel=0.05) and abs(weight.mean().item()) < 2e-3

    index = json.loads((tmp_path / "full" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected) and index["metadata"]["total_size"] == full["bytes"]
    for file in set(index["weight_map"].values()):
        tensors = load_file(str(tmp_path / "full" / file))
        size = sum(t.numel() * 2 for t in tensors.values())
        assert size <= cap or len(tensors) == 1, file
    assert full["shards"] == len(set(index["weight_map"].values())) > 1

    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "full"))
    assert model.config.num_hidden_layers == 3 and model.config.num_key_value_heads == 2
    assert sum(p.numel() for p in model.parameters()) == full["params"]
    assert torch.equal(model.model.layers[2].self_attn.k_proj.weight.half(), full_tensors["model.layers.2.self_attn.k_proj.weight"])
    # ExLlamaV2 0.3.2 reads rope_theta at the top level only
    assert json.loads((tmp_path / "full" / "config.json").read_text())["rope_theta"] == shape.rope_theta


def test_layer_params_count_a_transformers_decoder_layer(bench):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    shape = bench.Shape(hidden=random.choice([96, 160]), intermediate=random.choice([224, 352]), layers=1, heads=4, kv_heads=2)
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads)
    layer = LlamaDecoderLayer(config, 0)
    assert shape.layer_params() == sum(p.numel() for p in layer.parameters())


def gptq_events(durations, before, after=None):
    """Progress events as qtool's GPTQ pipeline sends them: a start, one per group, an end per layer."""
    events, t, n = [{"t": 0.0, "detail": "estimated peak memory 1 GiB on cuda"}, {"t": before / 2, "detail": "capturing calibration inputs"}], before, len(durations)
    for i, seconds in enumerate(durations, 1):
        events.append({"t": t, "detail": f"layer {i}/{n}"})
        events.append({"t": t + seconds / 3, "detail": f"layer {i}/{n} o_proj"})
        t += seconds
        events.append({"t": t, "detail": f"layer {i}/{n}"})
    if after is not None:
        events.append({"t": t, "detail": "writing checkpoint"})
    return events, t


def test_per_layer_time_and_extrapolation_of_a_finished_run(bench):
    durations = [random.uniform(5, 9) for _ in range(random.randint(2, 5))]
    before, write = random.uniform(10, 20), random.uniform(3, 6)
    events, t = gptq_events(durations, before, after=write)
    total = t + write
    full = 32
    out = bench.summarise_layers(events, total, len(durations), full)
    assert list(out["layer_seconds"].values()) == pytest.approx(durations, abs=1e-3)
    assert out["per_layer_s"] == pytest.approx(statistics.median(durations), abs=2e-3)
    assert out["rest_s"] == pytest.approx(before + write, abs=1e-2)
    expected = statistics.median(durations) * full + (before + write) * full / len(durations)
    assert out["extrapolated_s"] == pytest.approx(expected, abs=0.2)
    assert "projected_s" not in out


def test_a_run_cut_short_is_projected_from_its_finished_layers(bench):
    durations = [random.uniform(5, 9) for _ in range(3)]
    before = random.uniform(10, 20)
    events, t = gptq_events(durations, before)
    events.append({"t": t, "detail": "layer 4/32"})  # the layer in progress when the time ran out
    for event in events:
        event["detail"] = event["detail"].replace("/3", "/32")
    out = bench.summarise_layers(events, None, 32, 32)
    assert out["layers_timed"] == 3 and "extrapolated_s" not in out
    assert out["projected_s"] == pytest.approx(before + statistics.median(durations) * 32, abs=0.2)


def test_exl2_phases_add_up_per_layer(bench):
    measure = [random.uniform(2, 4) for _ in range(2)]
    quantize = [random.uniform(1, 2) for _ in range(2)]
    events, t = [{"t": 0.0, "detail": "weighing the linears"}], 5.0
    for phase, durations in (("measuring", measure), ("quantizing", quantize)):
        for i, seconds in enumerate(durations, 1):
            events.append({"t": t, "detail": f"{phase} layer {i}/2"})
            t += seconds
    events.append({"t": t, "detail": "quantizing the head"})
    out = bench.summarise_layers(events, t + 1.0, 2, 32)
    assert out["per_layer_s"] == pytest.approx(statistics.median(measure) + statistics.median(quantize), abs=3e-3)
    assert out["rest_s"] == pytest.approx(6.0, abs=1e-2)


def test_a_child_stage_reports_its_result_peak_rss_and_timeout(bench, tmp_path):
    megabytes = random.randint(150, 250)
    code = ("import json, time; block = bytearray(%d << 20); time.sleep(0.5);"
            "print(json.dumps({'progress': {'t': 0.1, 'detail': 'layer 1/2'}}), flush=True);"
            "print(json.dumps({'result': {'seconds': 1.5}}), flush=True)") % megabytes
    row = bench.run_child([sys.executable, "-c", code], timeout_s=60, log=tmp_path / "log")
    assert row["seconds"] == 1.5 and row["exit"] == 0 and not row["timed_out"]
    assert row["progress"] == [{"t": 0.1, "detail": "layer 1/2"}]
    # the child's (sampled from outside), not this larger process's that forked it
    assert megabytes / 1024 <= row["host_peak_rss_gib"] < (megabytes + 100) / 1024
    assert "layer 1/2" in (tmp_path / "log").read_text()

    slow = "import json, time; print(json.dumps({'progress': {'t': 0.0, 'detail': 'layer 1/9'}}), flush=True); time.sleep(60)"
    row = bench.run_child([sys.executable, "-c", slow], timeout_s=1.5)
    assert row["timed_out"] and row["exit"] != 0 and row["wall_s"] < 30
    assert row["progress"] and "error" in row


def test_the_ratio_is_qtools_time_over_the_peers_on_the_same_model(bench):
    mine, capped, peer = random.uniform(20, 60), random.uniform(20, 60), random.uniform(60, 200)
    rows = [
        {"row": "qtool gptq 4-bit g128 llama2-7b 4L", "stage": "qtool", "shape": "llama2-7b", "layers": 4, "full_layers": 32,
         "seconds": mine, "per_layer_s": 5.0, "extrapolated_s": 200.0},
        {"row": "qtool gptq 4-bit g128 llama2-7b 4L cap 24 GiB", "stage": "qtool", "shape": "llama2-7b", "layers": 4,
         "full_layers": 32, "seconds": capped, "cap_gib": 24.0},
        {"row": "qtool gptq 4-bit g128 llama2-7b 2L", "stage": "qtool", "shape": "llama2-7b", "layers": 2, "full_layers": 32,
         "seconds": 1.0},
        {"row": "GPTQModel 4-bit g128 llama2-7b 4L", "stage": "gptqmodel", "shape": "llama2-7b", "layers": 4, "full_layers": 32,
         "seconds": peer},
        {"row": "GPTQModel 4-bit g128 llama2-7b 32L", "stage": "gptqmodel", "shape": "llama2-7b", "layers": 32, "full_layers": 32,
         "skipped": "no time left"},
    ]
    bench.add_ratios(rows)
    assert rows[-1]["ratios"] == {  # the same model only: not the 2-layer run
        "qtool gptq 4-bit g128 llama2-7b 4L / GPTQModel 4-bit g128 llama2-7b 4L": pytest.approx(mine / peer, abs=1e-4),
        "qtool gptq 4-bit g128 llama2-7b 4L cap 24 GiB / GPTQModel 4-bit g128 llama2-7b 4L": pytest.approx(capped / peer, abs=1e-4),
    }
    table = bench.markdown_table(rows)
    # the table prints the stored ratio (rounded to 4 places) to 3: formatting the unrounded one may differ in the last digit
    assert f"**{round(mine / peer, 4):.3f}**" in table and "no time left" in table and "24 GiB" in table


def test_the_weighing_stage_gives_the_same_sensitivities_on_each_tier(bench, tokenizer_dir, tmp_path, make_calibration_text):
    shape = bench.Shape(hidden=128, intermediate=160, layers=2, heads=4, kv_heads=2, max_positions=256)
    bench.write_model(shape, 2, tokenizer_dir, tmp_path / "model", "cpu", seed=random.randrange(1 << 30))
    calibration = make_calibration_text(tmp_path / "calibration.txt")
    rows = {}
    for tier in (None, "disk"):
        argv = ["weigh", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "out"), "--calibration", str(calibration),
                "--samples", "3", "--seqlen", "24", "--device", "cpu"] + (["--activation-tier", tier] if tier else [])
        rows[tier] = bench.stage_weigh(bench.parser().parse_args(argv))
    assert rows[None]["weighing_tier"] == "host" and rows["disk"]["weighing_tier"] == "disk"  # the plan's, then the one asked for
    assert rows[None]["linears"] == 7 * 2 and rows[None]["sensitivity_digest"] == rows["disk"]["sensitivity_digest"]
    assert rows[None]["ladder_steps"] == [] and rows["disk"]["estimate"]["weighing_peaks"]["disk_bytes"] > 0 and not list(tmp_path.glob(".out.activations-*"))
    assert [e["detail"] for e in rows[None]["events"]][-1] == "weighing: done"
    table = bench.markdown_table([{"row": "qtool exl2 weighing pass tiny 2L", "stage": "weigh", "shape": "tiny", "layers": 2, "full_layers": 6,
                                   **rows["disk"]}])
    assert f"inputs: disk; 0 ladder steps; sensitivities {rows['disk']['sensitivity_digest']}" in table


@pytest.mark.slow
def test_the_tiny_plan_runs_every_stage_on_the_cpu(bench, tokenizer_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer").symlink_to(tokenizer_dir)
    (data / "wiki.valid.tokens").symlink_to(WIKITEXT_VALID)  # the shared WikiText-2 validation
    out = tmp_path / "rows.jsonl"
    assert bench.main(["plan", "gptq", "--tiny", "--work", str(tmp_path / "work"), "--data", str(data), "--out", str(out),
                       "--peer-layers", "2"]) == 0
    rows = {row["row"]: row for row in map(json.loads, out.read_text().splitlines())}
    # the capped run's row names its cap ("... tiny 2L cap 24 GiB")
    part = next(row for name, row in rows.items() if name.startswith("qtool gptq 4-bit g128 tiny 2L"))
    # so does the whole model's (the goal's budget), though on the CPU no cap applies
    whole = next(row for name, row in rows.items() if name.startswith("qtool gptq 4-bit g128 tiny 6L"))
    assert whole["cap_note"] == "no cap on the CPU"
    assert part["layers_timed"] == 2 and part["extrapolated_s"] > part["per_layer_s"] * 6
    assert whole["layers_timed"] == 6 and whole["output_gib"] > 0 and whole["host_peak_rss_gib"] > 0
    peer = rows["GPTQModel 4-bit g128 tiny 2L"]
    assert "seconds" in peer or "gptqmodel" in peer["skipped"]


def test_exllamav2_calibration_parquet_holds_the_whole_text_in_order(bench, tmp_path):
    import pandas

    rng = random.Random()
    text = "".join(f"line {i} {rng.random()}\n" if rng.random() > 0.2 else "\n" for i in range(rng.randint(300, 500)))
    (tmp_path / "text.txt").write_text(text)
    bench.write_calibration_parquet(tmp_path / "text.txt", tmp_path / "cal.parquet", rows=7)
    rows = pandas.read_parquet(tmp_path / "cal.parquet")["text"].tolist()
    assert len(rows) <= 7 and "".join(rows) == text


def test_every_plan_writes_each_model_before_a_stage_reads_it(bench, tmp_path):
    """Each plan's stages read only model directories an earlier write stage of the same plan makes, and the
    gptq-7b plan is the whole 7B alone: its write, then qtool on all 32 layers."""
    layers = {"peer": 4, "exl2": 1, "70b": 2}
    for name in bench.PLANS:
        written = set()
        for step in bench.plan_steps(name, tmp_path, tmp_path / "data", False, "cuda", {}, layers):
            argv = dict(zip(step.argv[::2], step.argv[1::2]))
            if step.stage == "write":
                written.add(argv["--dir"])
            else:
                assert argv["--model"] in written, f"{name}: {step.row} reads a model no earlier stage wrote"
    whole = bench.plan_steps("gptq-7b", tmp_path, tmp_path / "data", False, "cuda", {}, layers)
    assert [(s.stage, s.model_layers, s.shape) for s in whole] == [("write", 32, "llama2-7b"), ("qtool", 32, "llama2-7b")]
