"""A model's chat template as something to look at and edit (the studio page's editor, `qtool run --chat-template`):
which template the tokenizer ships, or the one qtool picks for a tokenizer without one and why; a sample
conversation rendered through any template, its errors returned as a message with the template line (never
raised); an edited template saved next to the model as chat_template.jinja (transformers reads that file before
tokenizer_config.json's template) or set on the loaded tokenizer for this session only."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.core.errors import QtoolError
from qtool.core.text_file import read_utf8

Message = dict[str, str]
TEMPLATE_FILE = "chat_template.jinja"  # transformers' own file name for a tokenizer's template

# ChatML: what qtool picks when the tokenizer has ChatML's special tokens but no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# For any other tokenizer: role-labelled paragraphs (the newlines as an expression: transformers' jinja settings trim
# a newline that follows a block tag), each reply ended by the tokenizer's end-of-sequence token.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SAMPLE_CONVERSATION: tuple[Message, ...] = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
)


@dataclass(frozen=True)
class TemplateSource:
    template: str
    origin: str  # "shipped" (the tokenizer's own), "picked" (qtool's, the tokenizer has none) or "session"
    reason: str  # where the shipped one was read from, or why this one was picked

    def to_dict(self) -> dict[str, str]:
        return {"template": self.template, "origin": self.origin, "reason": self.reason}


@dataclass(frozen=True)
class TemplateRender:
    text: str | None  # the rendered conversation, None on error
    error: str | None = None  # one line: what jinja or the template said
    line: int | None = None  # the template line the error points at, when known

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "error": self.error, "line": self.line}


def picked_template(tokenizer: Any) -> TemplateSource:
    """The template qtool uses for a tokenizer that ships none, and why."""
    vocabulary = tokenizer.get_vocab()
    if "<|im_start|>" in vocabulary and "<|im_end|>" in vocabulary:
        return TemplateSource(CHATML_TEMPLATE, "picked", "the tokenizer ships no chat template; its vocabulary has "
                              "ChatML's <|im_start|> and <|im_end|> tokens, so ChatML")
    return TemplateSource(PLAIN_TEMPLATE, "picked", "the tokenizer ships no chat template and has no ChatML tokens, "
                          "so plain 'Role: text' paragraphs, each reply ended by the end-of-sequence token")


def template_source(tokenizer: Any, model_dir: Path | None = None, session_template: str | None = None) -> TemplateSource:
    """The template replies go through: a session's own, else the tokenizer's (named by the file it came from when
    the model is a directory), else qtool's pick."""
    if session_template:
        return TemplateSource(session_template, "session", "set for this session only (not saved)")
    shipped = getattr(tokenizer, "chat_template", None)
    if isinstance(shipped, dict):  # several named templates: replies use the default one
        shipped = shipped.get("default")
    if shipped:
        if model_dir is not None and (Path(model_dir) / TEMPLATE_FILE).is_file():
            where = f"{TEMPLATE_FILE} next to the model"
        elif model_dir is not None and (Path(model_dir) / "tokenizer_config.json").is_file():
            where = "the model's tokenizer_config.json"
        else:
            where = "the tokenizer's metadata"
        return TemplateSource(shipped, "shipped", f"shipped with the tokenizer ({where})")
    return picked_template(tokenizer)


def template_error_line(exc: BaseException) -> int | None:
    """The template line an error points at: jinja's syntax errors carry it, runtime errors leave it in the
    traceback frames jinja compiled from the template source."""
    line = getattr(exc, "lineno", None)
    if isinstance(line, int):
        return line
    found, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            found = tb.tb_lineno
        tb = tb.tb_next
    return found


def render_template(tokenizer: Any, template: str, messages: list[Message] | tuple[Message, ...] = SAMPLE_CONVERSATION,
                    add_generation_prompt: bool = True) -> TemplateRender:
    """`messages` rendered through `template` with the tokenizer's special tokens; a template that cannot be
    compiled or fails while rendering gives a TemplateRender with the error instead of raising."""
    import jinja2

    if not template or not template.strip():
        return TemplateRender(None, "the template is empty", None)
    try:
        text = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    # jinja's syntax and undefined errors and raise_exception(); what the template's own expressions raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}"
        return TemplateRender(None, message, template_error_line(exc))
    if not isinstance(text, str):
        return TemplateRender(None, f"the template rendered a {type(text).__name__}, not text", None)
    return TemplateRender(text)


def checked_template(tokenizer: Any, template: str, what: str) -> str:
    """`template`, once the sample conversation renders through it; else one QtoolError naming `what`."""
    rendered = render_template(tokenizer, template)
    if not rendered.ok:
        where = f" at line {rendered.line}" if rendered.line else ""
        raise QtoolError(f"{what}: the chat template does not render{where}: {rendered.error}",
                         "fix the template (jinja2, with messages, add_generation_prompt and the special tokens)")
    return template


def read_template_file(path: str | Path, tokenizer: Any) -> str:
    """A template file (`--chat-template FILE`), checked by rendering the sample conversation."""
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"--chat-template {path} is not a file", "pass a jinja2 template file, e.g. chat_template.jinja")
    return checked_template(tokenizer, read_utf8(path), f"--chat-template {path}")


def save_template(tokenizer: Any, template: str, model_dir: Path) -> Path:
    """Writes `template` as model_dir/chat_template.jinja (atomically: a half-written template would break the
    model's next load) once it renders, and sets it on the loaded tokenizer. Returns the file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QtoolError(f"cannot save the chat template next to {model_dir}: not a model directory",
                         "a GGUF or Hub model takes a template for this session only")
    checked_template(tokenizer, template, f"{model_dir / TEMPLATE_FILE}")
    target = model_dir / TEMPLATE_FILE
    handle, partial = tempfile.mkstemp(dir=model_dir, prefix=".chat_template.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(template)
        os.replace(partial, target)
    except OSError as exc:
        Path(partial).unlink(missing_ok=True)
        raise QtoolError(f"cannot write {target}: {exc.strerror}", "check the model directory is writable") from None
    tokenizer.chat_template = template
    return target
