"""A model's generation_config.json recommends sampling values: a request that does not set a field gets the
model's value (the source said per field), one that does keeps its own; fields the file does not set come from
the engine's defaults. n choices draw with seeds seed, seed+1, ..."""

from __future__ import annotations

from transformers import GenerationConfig

from qtool.serve.completions import prepare
from qtool.serve.model_pool import SamplingDefaults
from qtool.serve.protocol import parse_chat_request
from qtool.serve.settings import ServeSettings

MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


def test_defaults_from_generation_config(one_thread, make_served):
    served = make_served("tiny")
    served.model.generation_config = GenerationConfig(do_sample=True, temperature=0.35, top_k=17)
    served.defaults = SamplingDefaults.from_model(served.model)
    assert served.defaults.values["temperature"] == 0.35 and served.defaults.values["top_k"] == 17
    assert served.defaults.sources == {"temperature": "generation_config.json", "top_k": "generation_config.json",
                                       "top_p": "engine default", "min_p": "engine default",
                                       "repetition_penalty": "engine default"}
    settings = ServeSettings(max_tokens_limit=32)
    _, (params,) = prepare(served, parse_chat_request({"model": "tiny", "messages": MESSAGES}, 4, 32), settings)
    assert (params.temperature, params.top_k, params.top_p) == (0.35, 17, 1.0)
    request = parse_chat_request({"model": "tiny", "messages": MESSAGES, "temperature": 0.9, "seed": 4, "n": 3}, 4, 32)
    ids, params = prepare(served, request, settings)
    assert [p.temperature for p in params] == [0.9] * 3 and [p.seed for p in params] == [4, 5, 6]
    assert all(p.top_k == 17 for p in params)
    # no max_tokens: the server's limit, cut where the model's 256 positions end
    assert params[0].max_tokens == min(32, 256 - len(ids))


def test_a_model_without_recommendations_uses_the_engine_defaults(one_thread, make_served):
    served = make_served("tiny")
    assert set(served.defaults.sources.values()) == {"engine default"}
    assert served.defaults.values == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                      "repetition_penalty": 1.0}
