"""Offline batches: outputs equal each request run alone, in input order, with totals (prefix hits included); the
fallback through generate; JSONL requests checked line by line (one-line errors naming file, line and field); outputs
written atomically and never over an existing file without force."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qtool.core.errors import QtoolError
from qtool.runtime.batch import BatchRequest, read_batch_requests, run_batch, write_batch_outputs
from qtool.runtime.engine import EngineConfig
from qtool.runtime.generate import GenerationSettings, generate
from qtool.runtime.reply import ReplyGenerator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEFAULTS = GenerationSettings(max_new_tokens=8, temperature=0)
SYSTEM = {"role": "system", "content": "the quick brown fox jumps over the lazy dog"}
LINES = [
    {"id": "a", "messages": [SYSTEM, {"role": "user", "content": "what is the capital of france"}]},
    {"id": 7, "prompt": "the lazy dog", "max_new_tokens": 14},
    {"id": "b", "messages": [SYSTEM, {"role": "user", "content": "the old city"}], "max_new_tokens": 3},
    {"id": "c", "prompt": "paris river", "temperature": 0.9, "top_k": 40, "min_p": 0.05, "seed": 3, "stop": ["zz"]},
    {"id": "d", "prompt": "new city", "repetition_penalty": 1.3, "stop": "the"},
]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_batch_outputs_equal_each_request_alone_in_input_order(model, tokenizer, tmp_path):
    requests = read_batch_requests(write_lines(tmp_path / "in.jsonl", LINES))
    progress = []
    result = run_batch(model, tokenizer, requests, DEFAULTS, progress=lambda done, total: progress.append((done, total)),
                       engine_config=EngineConfig(block_size=4, max_num_batched_tokens=16))
    assert [o.id for o in result.outputs] == ["a", 7, "b", "c", "d"]
    for request, output in zip(requests, result.outputs):
        settings = request.settings_over(DEFAULTS)
        # greedy requests against transformers; the seeded one against the engine alone (its own random stream)
        alone = (ReplyGenerator(model, tokenizer).reply if not settings.greedy else
                 lambda c, s: generate(model, tokenizer, c, s))(request.conversation, settings)
        assert (output.token_ids, output.text, output.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
        assert output.tokens == len(output.token_ids) and 0 < output.time_to_first_token <= output.seconds
    assert progress == [(i, 5) for i in range(1, 6)]
    totals = result.totals
    assert (totals.requests, totals.output_tokens, totals.backend) == (5, sum(o.tokens for o in result.outputs), "engine")
    assert totals.prefix_hit_requests >= 1 and totals.saved_prompt_tokens >= 12  # "b" shares "a"'s system turn
    assert totals.tokens_per_second > 0 and totals.preemptions == 0
    data = result.to_dict()
    assert set(data["outputs"][0]) == {"id", "text", "tokens", "finish_reason", "time_to_first_token", "seconds"}
    assert set(data["totals"]) >= {"requests", "output_tokens", "tokens_per_second", "saved_prompt_tokens", "preemptions"}


def test_a_model_the_engine_cannot_take_runs_one_request_at_a_time(build_family, tokenizer, caplog):
    model = build_family("phi", seed=1, vocab_size=len(tokenizer), max_position_embeddings=128)
    requests = [BatchRequest("x", prompt="the fox"), BatchRequest("y", messages=LINES[0]["messages"], settings={"max_new_tokens": 4})]
    with caplog.at_level(logging.WARNING, logger="qtool.runtime.batch"):
        result = run_batch(model, tokenizer, requests, DEFAULTS)
    assert len(caplog.records) == 1 and "one request at a time" in caplog.records[0].getMessage()
    assert result.totals.backend == "transformers" and [o.id for o in result.outputs] == ["x", "y"]
    for request, output in zip(requests, result.outputs):
        assert output.token_ids == generate(model, tokenizer, request.conversation, request.settings_over(DEFAULTS)).token_ids


def test_a_request_that_cannot_run_is_named_before_any_runs(model, make_tiny_tokenizer, tokenizer):
    plain = make_tiny_tokenizer()  # no chat template
    requests = [BatchRequest("ok", prompt="the fox"), BatchRequest("chat", messages=[{"role": "user", "content": "hi"}], line=4)]
    with pytest.raises(QtoolError, match=r"batch request 'chat' \(line 4\): the tokenizer has no chat template"):
        run_batch(model, plain, requests, DEFAULTS)
    with pytest.raises(QtoolError, match="batch request 'long'.*the model's context is 256"):
        run_batch(model, tokenizer, [BatchRequest("long", prompt="the quick brown fox " * 100)], DEFAULTS)


@pytest.mark.parametrize("lines,where,what", [
    ([{"prompt": "hi"}], 1, "field 'id' is missing"),
    ([{"id": "a", "prompt": "hi"}, "", {"id": "a", "prompt": "yo"}], 3, "id 'a' repeats the id of line 1"),
    ([{"id": "a", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}], 1, "give exactly one of the fields 'prompt' and 'messages', not both"),
    ([{"id": "a"}], 1, "give exactly one of the fields 'prompt' and 'messages'"),
    ([{"id": "a", "prompt": "hi"}, '{"id": "b", "prompt": "hi"'], 2, "invalid JSON"),
    (["[1, 2]"], 1, "expected a JSON object, got list"),
    ([{"id": True, "prompt": "hi"}], 1, "field 'id' must be a non-empty string or an integer"),
    ([{"id": "a", "prompt": 5}], 1, "field 'prompt' must be a non-empty string"),
    ([{"id": "a", "messages": [{"role": "user"}]}], 1, "field 'messages' must be a non-empty list"),
    ([{"id": "a", "prompt": "hi", "temperature": "hot"}], 1, "field 'temperature' must be a number >= 0 \\(0 is greedy\\), got 'hot'"),
    ([{"id": "a", "prompt": "hi", "top_k": 1.5}], 1, "field 'top_k' must be an integer >= 0"),
    ([{"id": "a", "prompt": "hi", "top_p": 0}], 1, "field 'top_p' must be a number in \\(0, 1\\]"),
    ([{"id": "a", "prompt": "hi", "max_new_tokens": 0}], 1, "field 'max_new_tokens' must be an integer >= 1"),
    ([{"id": "a", "prompt": "hi", "stop": ["ok", 3]}], 1, "field 'stop' must be a non-empty string or a list of them"),
    ([{"id": "a", "prompt": "hi", "seed": -1}], 1, "field 'seed' must be an integer >= 0 or null"),
    ([{"id": "a", "prompt": "hi", "max_tokens": 5}], 1, "unknown field 'max_tokens'"),
])
def test_bad_lines_are_refused_in_one_line_naming_file_line_and_field(tmp_path, lines, where, what):
    path = write_lines(tmp_path / "requests.jsonl", lines)
    with pytest.raises(QtoolError, match=f"line {where}: {what}") as info:
        read_batch_requests(path)
    assert str(path) in info.value.message and "\n" not in str(info.value)


def test_missing_and_empty_batch_files_are_refused(tmp_path):
    with pytest.raises(QtoolError, match="does not exist"):
        read_batch_requests(tmp_path / "none.jsonl")
    with pytest.raises(QtoolError, match="holds no requests"):
        read_batch_requests(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_settings_over_defaults(tmp_path):
    request = read_batch_requests(write_lines(tmp_path / "in.jsonl", [LINES[3]]))[0]
    settings = request.settings_over(DEFAULTS)
    assert (settings.temperature, settings.top_k, settings.min_p, settings.seed, settings.stop) == (0.9, 40, 0.05, 3, ("zz",))
    assert settings.max_new_tokens == DEFAULTS.max_new_tokens and request.line == 1


def test_outputs_are_written_atomically_and_never_over_a_file_without_force(model, tokenizer, tmp_path):
    result = run_batch(model, tokenizer, [BatchRequest("x", prompt="the fox"), BatchRequest("y", prompt="é ü")], DEFAULTS)
    out = tmp_path / "sub" / "out.jsonl"
    write_batch_outputs(out, result)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [o.to_dict() for o in result.outputs]
    with pytest.raises(QtoolError, match=f"output {out} already exists") as info:
        write_batch_outputs(out, result)
    assert "--force" in info.value.hint
    write_batch_outputs(out, result, force=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no temporary file left behind

    class Unwritable:
        def to_dict(self):
            raise RuntimeError("disk on fire")

    result.outputs.append(Unwritable())
    with pytest.raises(RuntimeError):
        write_batch_outputs(out, result, force=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"] and len(out.read_text().splitlines()) == 2
