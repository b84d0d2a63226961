"""Chat templates as something to view and edit: which one a tokenizer ships (or qtool's pick and why), a sample
rendered through an edited one, errors returned with their line, and a saved chat_template.jinja that the model's
next load uses."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qtool.core.errors import QtoolError
from qtool.runtime.chat_template_source import (CHATML_TEMPLATE, PLAIN_TEMPLATE, SAMPLE_CONVERSATION, TEMPLATE_FILE,
                                                read_template_file, render_template, save_template, template_source)


@pytest.fixture
def chat_tokenizer(make_tiny_tokenizer, tiny_chat_template):
    return make_tiny_tokenizer(chat_template=tiny_chat_template)


def test_shipped_template_is_named_with_its_file(tmp_path, chat_tokenizer, tiny_chat_template):
    chat_tokenizer.save_pretrained(tmp_path)
    source = template_source(AutoTokenizer.from_pretrained(tmp_path), tmp_path)
    assert source.origin == "shipped" and source.template == tiny_chat_template
    assert TEMPLATE_FILE in source.reason or "tokenizer_config.json" in source.reason
    session = template_source(chat_tokenizer, tmp_path, session_template="{{ messages[0]['content'] }}")
    assert session.origin == "session" and session.template == "{{ messages[0]['content'] }}"


def test_a_tokenizer_without_template_gets_chatml_when_it_has_the_tokens(make_tiny_tokenizer):
    source = template_source(make_tiny_tokenizer())  # the tiny vocabulary has <|im_start|> and <|im_end|>
    assert source.origin == "picked" and source.template == CHATML_TEMPLATE and "ChatML" in source.reason
    rendered = render_template(make_tiny_tokenizer(), source.template)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in SAMPLE_CONVERSATION) + "<|im_start|>assistant\n"
    assert rendered.ok and rendered.text == expected


def test_plain_template_for_a_vocabulary_without_chatml():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1, "</s>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    source = template_source(tokenizer)
    assert source.template == PLAIN_TEMPLATE and "no ChatML tokens" in source.reason
    text = render_template(tokenizer, source.template).text
    assert text == ("System: You are a helpful assistant.\n\nUser: What is the capital of France?\n\n"
                    "Assistant: Paris.</s>\n\nUser: And of Italy?\n\nAssistant:")


def test_an_edit_changes_the_rendering(chat_tokenizer):
    edited = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    rendered = render_template(chat_tokenizer, edited, add_generation_prompt=False)
    assert rendered.text == "".join(f"[{m['role'].upper()}] {m['content']}\n" for m in SAMPLE_CONVERSATION)


@pytest.mark.parametrize("template, error, line", [
    ("line one\n{% for m in messages %}{{ m['content'] }}", "TemplateSyntaxError", 2),
    ("ok\nok\n{{ raise_exception('roles must alternate') }}", "roles must alternate", 3),
    ("{{ messages[0]['content'] + 1 }}", "TypeError", 1),
    ("{{ messages[9]['content'] | upper }}", "UndefinedError", 1),
    ("   ", "the template is empty", None),
])
def test_template_errors_are_returned_with_their_line(chat_tokenizer, template, error, line):
    rendered = render_template(chat_tokenizer, template)
    assert not rendered.ok and rendered.text is None
    assert error in rendered.error and "\n" not in rendered.error
    assert rendered.line == line


def test_saved_template_is_what_the_next_load_uses(tmp_path, chat_tokenizer):
    chat_tokenizer.save_pretrained(tmp_path)
    edited = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    path = save_template(chat_tokenizer, edited, tmp_path)
    assert path == tmp_path / TEMPLATE_FILE and path.read_text() == edited
    assert chat_tokenizer.chat_template == edited
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == edited
    assert template_source(reloaded, tmp_path).reason.endswith(f"({TEMPLATE_FILE} next to the model)")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_broken_template_is_not_saved(tmp_path, chat_tokenizer, tiny_chat_template):
    chat_tokenizer.save_pretrained(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QtoolError, match="does not render at line 1"):
        save_template(chat_tokenizer, "{% if %}", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and chat_tokenizer.chat_template == tiny_chat_template
    with pytest.raises(QtoolError, match="not a model directory"):
        save_template(chat_tokenizer, CHATML_TEMPLATE, tmp_path / "model.gguf")


def test_template_file_for_the_cli(tmp_path, chat_tokenizer):
    good, bad = tmp_path / "good.jinja", tmp_path / "bad.jinja"
    good.write_text(CHATML_TEMPLATE)
    bad.write_text("{{ messages[0]['content'] + 1 }}")
    assert read_template_file(good, chat_tokenizer) == CHATML_TEMPLATE
    with pytest.raises(QtoolError, match=r"--chat-template .*bad.jinja: the chat template does not render"):
        read_template_file(bad, chat_tokenizer)
    with pytest.raises(QtoolError, match="is not a file"):
        read_template_file(tmp_path / "none.jinja", chat_tokenizer)
