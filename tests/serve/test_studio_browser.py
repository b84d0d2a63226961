"""The studio page in a real browser: Playwright driving Debian's headless Chromium (scripts/install_browser.sh
installs it) against `qtool serve`'s app on a free loopback port with two tiny random models. A chat streams (the
text grows piece by piece to the server's own greedy reply), the arena streams both models side by side and saves
a vote, an edited template re-renders (and a broken one shows its error inline), two files get the token count
the tokenizer gives. Screenshots of each go to $QTOOL_TEST_ARTIFACTS (else a temporary folder), printed."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import urllib.request
import pytest

from qtool.runtime.engine import EngineConfig
from qtool.serve.model_pool import ServedModel
from qtool.serve.settings import ServeSettings

from cli_checks import save_model_dir

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed: run scripts/install_browser.sh")
ENGINE = EngineConfig(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=256)
REPLY_TOKENS = 12
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("QTOOL_TEST_ARTIFACTS") or tempfile.mkdtemp(prefix="qtool-studio-")) / "studio"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nstudio screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, make_tiny_tokenizer, tiny_chat_template, one_thread):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("qtool_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    root = module_from_spec(spec)
    spec.loader.exec_module(root)
    dirs = {}
    for name, seed in (("tiny-a", 11), ("tiny-b", 12)):
        tokenizer = make_tiny_tokenizer(chat_template=tiny_chat_template)
        model = root.build_tiny_llama(seed=seed, vocab_size=len(tokenizer))
        dirs[name] = (save_model_dir(tmp_path_factory.mktemp(name) / name, model, tokenizer), model, tokenizer)
    return dirs


@pytest.fixture(scope="module")
def server(model_dirs, start_server, tmp_path_factory):
    votes = tmp_path_factory.mktemp("votes") / "votes.jsonl"
    served = [ServedModel(name, model, tokenizer, ENGINE, source=str(directory))
              for name, (directory, model, tokenizer) in model_dirs.items()]
    running = start_server(served, ServeSettings(port=0, arena_votes=str(votes)))
    running.votes = votes
    running.served = {m.name: m for m in served}
    return running


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # root in a container has no user namespaces for chromium's sandbox
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    yield page
    page.close()


def greedy_settings(page) -> None:
    page.fill("#s-temperature", "0")
    page.fill("#max_tokens", str(REPLY_TOKENS))


def api_reply(server, model: str, messages) -> str:
    """The server's own whole (non-streamed) greedy reply: what the page must end up showing."""
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": REPLY_TOKENS}).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def api_stream_prefixes(server, model: str, messages) -> list[str]:
    """The text the server's own stream has after each of its text deltas: what the page must show, piece by piece
    (how many pieces depends on the reply: the engine holds back text that ends inside a character)."""
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": REPLY_TOKENS,
                       "stream": True}).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    prefixes, text = [], ""
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if piece:
                    text += piece
                    prefixes.append(text)
    return prefixes


def record_text_growth(page, selector: str) -> None:
    """Keeps every distinct text the element under `selector` shows (window.growth[selector]) as it changes. Read
    from each mutation record, not from the element when the observer runs: a fast server's pieces can all arrive
    in one network read and be rendered within one task, and the observer then runs once, after the last."""
    page.evaluate("""(selector) => {
        window.growth = window.growth || {};
        window.growth[selector] = [];
        const seen = window.growth[selector];
        const keep = (text) => { if (seen[seen.length - 1] !== text) seen.push(text); };
        new MutationObserver((records) => {
            for (const record of records) {
                const el = record.target.nodeType === Node.TEXT_NODE ? record.target.parentElement : record.target;
                if (!el || !el.matches(selector)) continue;
                if (record.type === "characterData") keep(record.target.data);
                for (const node of record.addedNodes) keep(node.textContent);
            }
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""", selector)


def test_chat_streams_the_reply(page, server, artifacts):
    greedy_settings(page)
    record_text_growth(page, ".msg.assistant .content")
    page.fill("#system", "be brief")
    page.fill("#chat-input", "the quick fox")
    page.click("#send")
    page.wait_for_selector("#chat-stats:has-text('tokens/s')")
    expected = api_reply(server, "tiny-a", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick fox"}])
    shown = page.locator(".msg.assistant .content").inner_text()
    growth = page.evaluate("window.growth['.msg.assistant .content']")
    assert page.locator(".msg.assistant .content").evaluate("el => el.textContent") == expected
    # streamed: the page showed the text after each of the server's stream pieces, in order
    pieces = [text for text in growth if text]
    assert pieces == api_stream_prefixes(server, "tiny-a", [{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "the quick fox"}]), pieces
    assert pieces[-1] == expected
    assert shown.strip() or expected.strip() == ""
    assert f"{REPLY_TOKENS} tokens" in page.inner_text("#chat-stats")
    page.screenshot(path=str(artifacts / "chat.png"), full_page=True)


def test_arena_streams_both_models_and_saves_a_vote(page, server, artifacts):
    greedy_settings(page)
    page.click(".tab[data-tab=arena]")
    for name in ("tiny-a", "tiny-b"):
        record_text_growth(page, f".arena-col[data-model={name}] .content")
    page.fill("#arena-prompt", "what is the capital of france")
    page.click("#arena-run")
    page.wait_for_selector("#arena-vote:not([hidden])")
    messages = [{"role": "user", "content": "what is the capital of france"}]
    for name in ("tiny-a", "tiny-b"):
        column = page.locator(f".arena-col[data-model={name}]")
        assert column.locator(".content").evaluate("el => el.textContent") == api_reply(server, name, messages)
        stats = column.locator(".stats").inner_text()
        assert f"{REPLY_TOKENS} tokens" in stats and "first token" in stats and "tokens/s" in stats
        shown_pieces = [t for t in page.evaluate(f"window.growth['.arena-col[data-model={name}] .content']") if t]
        assert shown_pieces == api_stream_prefixes(server, name, messages), shown_pieces
    page.screenshot(path=str(artifacts / "arena.png"), full_page=True)
    page.click("#arena-vote button[data-vote=tiny-b]")
    page.wait_for_selector("#vote-status:has-text('saved to')")
    record = json.loads(server.votes.read_text().splitlines()[-1])
    assert record["winner"] == "tiny-b" and record["models"] == ["tiny-a", "tiny-b"]
    assert record["prompt"] == "what is the capital of france"
    assert record["replies"]["tiny-a"]["text"] == api_reply(server, "tiny-a", messages)


def test_template_edit_changes_the_rendering(page, server, artifacts):
    from jinja2 import Environment

    page.click(".tab[data-tab=template]")
    page.wait_for_selector("#template-origin[data-origin=shipped]")
    before = page.inner_text("#template-render")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in before
    edited = "{% for m in messages %}## {{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    page.fill("#template-editor", edited)
    from qtool.runtime.chat_template_source import SAMPLE_CONVERSATION

    expected = Environment().from_string(edited).render(messages=SAMPLE_CONVERSATION)
    page.wait_for_function("(text) => document.getElementById('template-render').textContent === text", arg=expected)
    page.screenshot(path=str(artifacts / "template.png"), full_page=True)
    page.fill("#template-editor", "ok\n{% for m in messages %}{{ m['content'] }")
    page.wait_for_selector("#template-error:not([hidden])")
    assert page.inner_text("#template-error").startswith("line 2: TemplateSyntaxError")
    page.screenshot(path=str(artifacts / "template-error.png"), full_page=True)
    # the served model's template is untouched until saved
    assert server.served["tiny-a"].tokenizer.chat_template != edited


def test_two_files_get_their_token_count(page, server, artifacts, tmp_path):
    files = {"a.py": "def fox():\n    return 'the quick brown fox'\n", "notes.md": "# notes\nthe lazy dog jumps over the river\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    page.fill("#chat-input", "what do these say")
    page.set_input_files("#file-input", [str(tmp_path / name) for name in files])
    page.wait_for_function("document.getElementById('token-count').dataset.tokens !== undefined")
    tokenizer = server.served["tiny-a"].tokenizer
    blocks = "\n\n".join(f'<file name="{name}">\n{text}\n</file>' for name, text in files.items())
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{blocks}\n\nwhat do these say"}],
                                         add_generation_prompt=True, tokenize=False)
    expected = len(tokenizer.encode(text, add_special_tokens=False))
    assert int(page.get_attribute("#token-count", "data-tokens")) == expected
    assert page.inner_text("#token-count") == f"prompt {expected} tokens of the 256-token context, 64 kept for the reply"
    for name, text in files.items():
        item = page.locator(f"#file-list li[data-name='{name}']")
        assert f"{len(tokenizer.encode(text, add_special_tokens=False))} tokens" in item.inner_text()
    page.screenshot(path=str(artifacts / "files.png"), full_page=True)


def test_a_pdf_is_refused_on_the_page(page, tmp_path):
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4\n" + base64.b64decode("AAEC"))
    page.set_input_files("#file-input", [str(tmp_path / "paper.pdf")])
    page.wait_for_selector("#banner:not([hidden])")
    assert "PDF files are not read" in page.inner_text("#banner")
