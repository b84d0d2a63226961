"""Files as context for a reply (`qtool run --file`, the studio page): each text or code file becomes a labelled
block in front of the last user message, the prompt is counted in the model's own tokens, and a conversation that
does not fit the context is cut by one stated policy, the cuts returned so they can be shown.

Fitting policy (FIT_POLICY): the system message and the last user message are never touched. First the oldest chat
turns go, one at a time; then the files are cut from their tails, the last file first (a cut file keeps its head and
says how much was cut); a prompt that still does not fit is refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qtool.core.errors import QtoolError

Message = dict[str, str]

FIT_POLICY = ("oldest chat turns first, then file tails (the last file first); the system message and the last "
              "user message are kept whole")
PDF_MAGIC = b"%PDF-"
PDF_REFUSAL = "PDF files are not read (no PDF parser is installed with qtool)"
CUT_MARKER = "\n[... {tokens} tokens cut to fit the context]"


@dataclass(frozen=True)
class ContextFile:
    name: str  # the label the model sees: the file name as given
    text: str


def context_file_from_bytes(name: str, data: bytes) -> ContextFile:
    """A text file's content (an upload, or read from disk): UTF-8 text only; a PDF or a binary file is refused with
    one QtoolError naming it."""
    if data.startswith(PDF_MAGIC) or name.lower().endswith(".pdf"):
        raise QtoolError(f"file {name}: {PDF_REFUSAL}", "convert it to text first (e.g. pdftotext) and pass the .txt")
    if b"\x00" in data[:8192]:
        raise QtoolError(f"file {name} is binary, not text", "pass text or code files (UTF-8)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QtoolError(f"file {name} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})",
                         "pass text or code files saved as UTF-8") from None
    return ContextFile(name, text.removeprefix("\ufeff"))


def read_context_file(path: str | Path) -> ContextFile:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise QtoolError(f"--file {path} does not exist", "pass an existing text or code file") from None
    except IsADirectoryError:
        raise QtoolError(f"--file {path} is a directory", "pass files one by one: --file a.py --file b.md") from None
    except OSError as exc:
        raise QtoolError(f"--file {path} cannot be read: {exc.strerror}", "check the file's permissions") from None
    return context_file_from_bytes(path.name, data)


def file_block(file: ContextFile) -> str:
    """The labelled block the model reads; the label is the file name."""
    return f'<file name="{file.name}">\n{file.text}\n</file>'


def with_files(messages: list[Message], files: list[ContextFile]) -> list[Message]:
    """`messages` with the files' blocks in front of the last user message's text."""
    if not files:
        return list(messages)
    last = last_user_index(messages)
    blocks = "\n\n".join(file_block(f) for f in files)
    content = messages[last]["content"]
    return messages[:last] + [{**messages[last], "content": f"{blocks}\n\n{content}" if content else blocks}] + messages[last + 1 :]


def last_user_index(messages: list[Message]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            return index
    raise QtoolError("the conversation has no user message to attach the files to", "add a prompt (--prompt TEXT)")


def raw_text(messages: list[Message]) -> str:
    """A conversation as one text for a model without a chat template (run --raw's layout: the system text, a blank
    line, the prompt)."""
    return "\n\n".join(m["content"] for m in messages if m.get("content"))


def prompt_token_count(tokenizer: Any, messages: list[Message], raw: bool = False) -> int:
    """The prompt's length in the model's tokens, as the reply will see it (chat template and its generation
    prompt, or the raw text with the tokenizer's own special tokens)."""
    if raw:
        return len(tokenizer(raw_text(messages))["input_ids"])
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class FileFit:
    name: str
    tokens: int  # the file's text alone, in the model's tokens
    kept_tokens: int  # what is left of it after the fitting (== tokens when nothing was cut)

    @property
    def cut_tokens(self) -> int:
        return self.tokens - self.kept_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tokens": self.tokens, "kept_tokens": self.kept_tokens, "cut_tokens": self.cut_tokens}


@dataclass
class ContextFit:
    messages: list[Message]  # what to send: the kept turns, the (cut) file blocks in the last user message
    prompt_tokens: int  # the prompt `messages` make
    original_tokens: int  # the prompt before any cut
    context_length: int | None  # the model's positions (None: unknown, nothing is cut)
    reserve_tokens: int  # kept free for the reply
    files: list[FileFit] = field(default_factory=list)
    dropped_turns: list[Message] = field(default_factory=list)  # removed oldest first
    cuts: list[str] = field(default_factory=list)  # one line per cut, in the order they were made
    policy: str = FIT_POLICY

    @property
    def budget(self) -> int | None:
        return None if self.context_length is None else self.context_length - self.reserve_tokens

    @property
    def fits_uncut(self) -> bool:
        return not self.cuts

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "original_tokens": self.original_tokens,
                "context_length": self.context_length, "reserve_tokens": self.reserve_tokens, "budget": self.budget,
                "files": [f.to_dict() for f in self.files], "dropped_turns": len(self.dropped_turns),
                "cuts": self.cuts, "policy": self.policy}


def model_context_length(model_or_config: Any) -> int | None:
    """The model's positions (max_position_embeddings), None when its config does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_context(tokenizer: Any, messages: list[Message], files: list[ContextFile], context_length: int | None,
                reserve_tokens: int = 0, raw: bool = False) -> ContextFit:
    """The conversation with the files attached, cut by FIT_POLICY until prompt + reserve_tokens fit
    context_length. A system message plus the last user message that alone do not fit raise QtoolError."""
    count: Callable[[list[Message]], int] = lambda msgs: prompt_token_count(tokenizer, msgs, raw)  # noqa: E731
    file_tokens = [len(tokenizer(f.text, add_special_tokens=False)["input_ids"]) for f in files]
    fits = [FileFit(f.name, n, n) for f, n in zip(files, file_tokens)]
    current = with_files(messages, files)
    original = count(current)
    fit = ContextFit(current, original, original, context_length, reserve_tokens, fits)
    if context_length is None:
        return fit
    budget = context_length - reserve_tokens
    if budget < 1:
        raise QtoolError(f"the reply's {reserve_tokens} tokens leave no room in the model's context of {context_length}",
                         "ask for fewer new tokens (--max-new-tokens, or max_tokens)")
    turns, kept = list(messages), list(files)
    total = original
    # 1. the oldest turns: a user message with the replies after it (so the conversation still starts with a user
    # turn, which many templates require); never the system message, never the last user message
    while total > budget:
        oldest = next((i for i, m in enumerate(turns) if m.get("role") != "system"), None)
        if oldest is None or oldest >= last_user_index(turns):
            break
        dropped = [turns.pop(oldest)]
        while oldest < last_user_index(turns) and turns[oldest].get("role") != "user":
            dropped.append(turns.pop(oldest))
        fit.dropped_turns += dropped
        before = total
        current = with_files(turns, kept)
        total = count(current)
        fit.cuts.append(f"dropped the oldest turn ({' + '.join(m.get('role', '?') for m in dropped)}, "
                        f"{before - total} tokens)")
    # 2. the files' tails, the last file first
    for index in range(len(kept) - 1, -1, -1):
        if total <= budget:
            break
        kept[index], fits[index].kept_tokens = cut_file_tail(tokenizer, kept[index], file_tokens[index],
                                                              lambda f: count(with_files(turns, kept[:index] + [f] + kept[index + 1 :])), budget)
        cut = fits[index].cut_tokens
        fit.cuts.append(f"cut {cut} of {file_tokens[index]} tokens from the end of {kept[index].name}")
        current = with_files(turns, kept)
        total = count(current)
    if total > budget:
        raise QtoolError(f"the prompt needs {total} tokens but the model's context of {context_length} leaves {budget} "
                         f"after {reserve_tokens} for the reply, even with every earlier turn dropped and every file cut",
                         "shorten the system message or the prompt, or ask for fewer new tokens")
    fit.messages, fit.prompt_tokens = current, total
    return fit


def cut_file_tail(tokenizer: Any, file: ContextFile, tokens: int, total_with: Callable[[ContextFile], int],
                  budget: int) -> tuple[ContextFile, int]:
    """The longest head of `file` (whole tokens, with a marker saying how much was cut) for which the prompt fits
    `budget`, and its kept token count; 0 kept when even the bare label does not fit (the caller then refuses)."""
    ids = tokenizer(file.text, add_special_tokens=False)["input_ids"]

    def head(keep: int) -> ContextFile:
        return ContextFile(file.name, tokenizer.decode(ids[:keep]) + CUT_MARKER.format(tokens=tokens - keep))

    low, high = 0, tokens - 1  # the prompt length grows with the head kept: find the largest head that fits
    if total_with(head(low)) > budget:
        return head(0), 0
    while low < high:
        middle = (low + high + 1) // 2
        if total_with(head(middle)) <= budget:
            low = middle
        else:
            high = middle - 1
    return head(low), low
