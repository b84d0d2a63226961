"""Logprobs in offline batches: a line that asks (`"logprobs": k`) gets each new token's logprob and k alternatives
in its output line, equal to transformers' forward logits over the same tokens; lines that do not ask are unchanged;
bad values and a model only generate can run are refused in one line naming the request."""

from __future__ import annotations

import json

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.batch import BatchRequest, read_batch_requests, run_batch, write_batch_outputs
from qtool.runtime.generate import GenerationSettings, prompt_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEFAULTS = GenerationSettings(max_new_tokens=8, temperature=0)
LINES = [{"id": "a", "prompt": "the lazy dog", "temperature": 0.9, "seed": 3, "logprobs": 2},
         {"id": "b", "prompt": "paris river", "max_new_tokens": 5},
         {"id": "c", "messages": [{"role": "user", "content": "the old city"}], "logprobs": 0}]


def write_lines(path, lines):
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_lines_that_ask_carry_the_models_logprobs(model, tokenizer, tmp_path):
    requests = read_batch_requests(write_lines(tmp_path / "in.jsonl", LINES))
    result = run_batch(model, tokenizer, requests, DEFAULTS)
    out = tmp_path / "out.jsonl"
    write_batch_outputs(out, result)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert "logprobs" not in rows[1]
    for i, k in ((0, 2), (2, 0)):
        row, output = rows[i], result.outputs[i]
        assert len(row["logprobs"]) == row["tokens"] == len(output.token_ids)
        prompt = prompt_ids(tokenizer, requests[i].conversation)[0].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + output.token_ids]), use_cache=False).logits[0].double()
        reference = logits[len(prompt) - 1 : -1].log_softmax(dim=-1)
        for ref, token, entry in zip(reference, output.token_ids, row["logprobs"]):
            assert entry["token_id"] == token and entry["token"] == tokenizer.decode([token])
            assert entry["logprob"] == pytest.approx(ref[token].item(), abs=2e-5)
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(ref.topk(k).values.tolist(), abs=2e-5)
    # asking changes no token
    plain = run_batch(model, tokenizer, [BatchRequest(r.id, r.prompt, r.messages, r.settings) for r in requests], DEFAULTS)
    assert [o.token_ids for o in plain.outputs] == [o.token_ids for o in result.outputs]
    assert all("logprobs" not in o.to_dict() for o in plain.outputs)


@pytest.mark.parametrize("value", [21, -1, True, "2"])
def test_bad_logprobs_are_refused_naming_line_and_field(tmp_path, value):
    path = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": "hi", "logprobs": value}])
    with pytest.raises(QtoolError, match=r"line 2: field 'logprobs' must be an integer in 0\.\.20"):
        read_batch_requests(path)


def test_logprobs_need_the_engine(build_family, tokenizer):
    model = build_family("phi", seed=1, vocab_size=len(tokenizer), max_position_embeddings=128)
    requests = [BatchRequest("x", prompt="the fox"), BatchRequest("y", prompt="the dog", line=2, logprobs=1)]
    with pytest.raises(QtoolError, match=r"batch request 'y' \(line 2\): logprobs need the engine") as caught:
        run_batch(model, tokenizer, requests, DEFAULTS)
    assert "\n" not in str(caught.value)
