"""The real SmolLM2-135M-Instruct (GGUF alias) served: the openai client's greedy chat reply is the one `qtool run`
gives (ReplyGenerator), whole and streamed."""

from __future__ import annotations

import openai
import pytest

from qtool.runtime.engine import EngineConfig
from qtool.runtime.engine_sizing import EngineSizing
from qtool.runtime.generate import GenerationSettings
from qtool.runtime.reply import ReplyGenerator
from qtool.serve.model_pool import load_served_models
from qtool.serve.settings import ServeSettings

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_chat_equals_qtool_run(one_thread, smollm2_path, start_server):
    (served,) = load_served_models(["smollm2-135m"], ["smol"], EngineConfig(), EngineSizing(8, 256), device="cpu")
    server = start_server([served], ServeSettings(port=0))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, temperature=0)
    expected = ReplyGenerator(served.model, served.tokenizer).reply(
        QUESTION, GenerationSettings(max_new_tokens=24, temperature=0)).text
    assert reply.choices[0].message.content == expected and "Paris" in expected
    streamed = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
