"""The studio page's routes over real HTTP: sampling defaults with their sources, the template view of a shipped and
of a picked template, a template saved next to the model (or for the session) changing the next /v1 reply, the
context fit of uploaded files, arena votes appended to the JSONL file, the API key, and bad requests as 4xx in
OpenAI's error shape."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from transformers import GenerationConfig

from qtool.runtime.chat_template_source import CHATML_TEMPLATE, TEMPLATE_FILE
from qtool.runtime.context_files import ContextFile, file_block
from qtool.runtime.engine import EngineConfig
from qtool.serve.model_pool import ServedModel
from qtool.serve.settings import ServeSettings

from cli_checks import save_model_dir

KEY = "studio-key"
ENGINE = EngineConfig(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=256)


def call(server, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
    """(status, decoded JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.url + path, data, {"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny_tokenizer, tiny_chat_template, start_server, one_thread):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("qtool_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    root = module_from_spec(spec)
    spec.loader.exec_module(root)
    shipped_tokenizer = make_tiny_tokenizer(chat_template=tiny_chat_template)
    shipped = root.build_tiny_llama(seed=21, vocab_size=len(shipped_tokenizer))
    shipped.generation_config = GenerationConfig(temperature=0.6, top_p=0.95, do_sample=True)
    directory = save_model_dir(tmp_path_factory.mktemp("shipped") / "shipped", shipped, shipped_tokenizer)
    bare_tokenizer = make_tiny_tokenizer()  # no chat template; not loaded from a directory
    bare = root.build_tiny_llama(seed=22, vocab_size=len(bare_tokenizer))
    votes = tmp_path_factory.mktemp("votes") / "sub" / "votes.jsonl"
    models = [ServedModel("shipped", shipped, shipped_tokenizer, ENGINE, source=str(directory)),
              ServedModel("bare", bare, bare_tokenizer, ENGINE, source="bare.gguf")]
    running = start_server(models, ServeSettings(port=0, api_key=KEY, arena_votes=str(votes)))
    running.directory, running.votes = directory, votes
    running.models = {m.name: m for m in models}
    return running


def greedy(server, model: str, content: str) -> str:
    status, body = call(server, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": content}],
                                                         "temperature": 0, "max_tokens": 8})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_models_show_sampling_defaults_with_their_source(server):
    status, body = call(server, "/studio/api/models")
    assert status == 200
    facts = {m["name"]: m for m in body["models"]}
    defaults = facts["shipped"]["sampling_defaults"]
    assert defaults["values"]["temperature"] == 0.6 and defaults["sources"]["temperature"] == "generation_config.json"
    assert defaults["values"]["top_p"] == 0.95 and defaults["sources"]["top_p"] == "generation_config.json"
    assert defaults["sources"]["min_p"] == "engine default"
    assert all(source == "engine default" for source in facts["bare"]["sampling_defaults"]["sources"].values())
    assert facts["shipped"]["can_save_template"] and not facts["bare"]["can_save_template"]
    assert body["votes_file"] == str(server.votes) and body["require_key"]


def test_the_key_guards_the_studio_routes_not_the_page(server):
    assert call(server, "/studio/api/models", key=None)[0] == 401
    assert call(server, "/studio/api/models", key="wrong")[0] == 401
    status, page = call(server, "/", key=None)
    assert status == 200 and "<title>qtool studio</title>" in page
    assert call(server, "/static/studio.js", key=None)[0] == 200
    assert call(server, "/static/..%2Fapp.py", key=None)[0] == 404


def test_a_tokenizer_without_template_shows_qtools_pick(server):
    status, view = call(server, "/studio/api/template?model=bare")
    assert status == 200 and view["origin"] == "picked" and view["template"] == CHATML_TEMPLATE
    assert "ChatML" in view["reason"] and view["render"]["error"] is None and not view["can_save"]
    status, error = call(server, "/studio/api/template/save", {"model": "bare", "template": CHATML_TEMPLATE, "scope": "model"})
    assert status == 400 and "use scope 'session'" in error["error"]["message"]


def test_render_returns_errors_inline(server):
    status, render = call(server, "/studio/api/template/render", {"model": "shipped", "template": "a\n{{ raise_exception('no') }}"})
    assert status == 200 and render == {"text": None, "error": "TemplateError: no", "line": 2}


def test_a_saved_template_is_written_and_changes_the_next_reply(server):
    before = greedy(server, "shipped", "the fox")
    edited = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}<|im_start|>"
    status, broken = call(server, "/studio/api/template/save", {"model": "shipped", "template": "{% for %}", "scope": "model"})
    assert status == 400 and broken["error"]["code"] == "template_error"
    status, saved = call(server, "/studio/api/template/save", {"model": "shipped", "template": edited, "scope": "model"})
    assert status == 200 and saved["saved"] == str(server.directory / TEMPLATE_FILE)
    assert (server.directory / TEMPLATE_FILE).read_text() == edited
    after = greedy(server, "shipped", "the fox")
    # the server's reply now follows the edited template: the same as a fresh engine run over its rendering
    from qtool.runtime.generate import GenerationSettings, generate

    tokenizer = server.models["shipped"].tokenizer
    expected = generate(server.models["shipped"].model, tokenizer, [{"role": "user", "content": "the fox"}],
                        GenerationSettings(max_new_tokens=8, temperature=0)).text
    assert after == expected and after != before
    status, view = call(server, "/studio/api/template?model=shipped")
    assert view["origin"] == "shipped" and view["template"] == edited


def test_a_session_template_writes_nothing(server):
    status, _ = call(server, "/studio/api/template/save", {"model": "bare", "template": CHATML_TEMPLATE, "scope": "session"})
    assert status == 200
    status, view = call(server, "/studio/api/template?model=bare")
    assert view["origin"] == "session" and view["template"] == CHATML_TEMPLATE
    assert not Path("bare.gguf").exists()
    assert greedy(server, "bare", "the fox") is not None  # the chat route now takes it
    status, bad = call(server, "/studio/api/template/save", {"model": "bare", "template": CHATML_TEMPLATE, "scope": "disk"})
    assert status == 400 and bad["error"]["param"] == "scope"


def test_files_are_fitted_in_front_of_the_last_message(server):
    files = [ContextFile("a.py", "print('the fox')\n"), ContextFile("b.md", "lazy dog " * 300)]  # b.md is past the context
    payload = [{"name": f.name, "data": base64.b64encode(f.text.encode()).decode()} for f in files]
    status, fit = call(server, "/studio/api/context", {"model": "shipped", "messages": [{"role": "user", "content": "sum up"}],
                                                       "files": payload, "max_tokens": 32})
    assert status == 200, fit
    assert fit["files"][0]["cut_tokens"] == 0 and fit["files"][1]["cut_tokens"] > 0
    assert fit["prompt_tokens"] <= 256 - 32 < fit["original_tokens"]
    content = fit["messages"][-1]["content"]
    assert content.startswith(file_block(files[0])) and content.endswith("sum up")
    assert any("from the end of b.md" in cut for cut in fit["cuts"])


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [{"role": "user", "content": "x"}], "files": [{"name": "p.pdf", "data": base64.b64encode(b"%PDF-1.4").decode()}]}, "files", "PDF files are not read"),
    ({"messages": [{"role": "user", "content": "x"}], "files": [{"name": "a", "data": "***"}]}, "files", "not base64"),
    ({"messages": [{"role": "robot", "content": "x"}], "files": []}, "messages", "is invalid"),
    ({"messages": [{"role": "user", "content": "x"}], "files": [], "max_tokens": -1}, "max_tokens", "an integer >= 0"),
])
def test_bad_context_requests_are_400(server, body, param, words):
    status, error = call(server, "/studio/api/context", {"model": "shipped", **body})
    assert status == 400 and error["error"]["param"] == param and words in error["error"]["message"]


def test_votes_are_appended_to_the_jsonl_file(server):
    for winner in ("bare", "tie"):
        status, _ = call(server, "/studio/api/arena/vote", {"prompt": "p", "models": ["shipped", "bare"], "winner": winner,
                                                            "replies": {"shipped": {"text": "a"}, "bare": {"text": "b"}}})
        assert status == 200
    lines = [json.loads(line) for line in server.votes.read_text().splitlines()]
    assert [line["winner"] for line in lines[-2:]] == ["bare", "tie"]
    assert lines[-1]["replies"] == {"shipped": {"text": "a"}, "bare": {"text": "b"}} and lines[-1]["prompt"] == "p"
    for body, param in (({"prompt": "p", "models": ["shipped", "bare"], "winner": "nobody"}, "winner"),
                        ({"prompt": "p", "models": ["shipped"], "winner": "shipped"}, "models"),
                        ({"prompt": "p", "models": ["shipped", "ghost"], "winner": "tie"}, "model")):
        status, error = call(server, "/studio/api/arena/vote", body)
        assert status in (400, 404) and error["error"]["param"] == param
    assert call(server, "/studio/api/arena/vote", raw=b"{not json")[0] == 400
