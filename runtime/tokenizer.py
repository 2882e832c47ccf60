"""Tokenizer and chat template without transformers: `tokenizers` + jinja2, as HF renders them."""
from __future__ import annotations

import re
import uuid
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from dovetail_onnx.runtime.errors import DovetailError


def _raise(message: str) -> None:
    raise TemplateError(message)


def _load(path: Path, plain: bool) -> HFTokenizer:
    try:
        tokenizer = HFTokenizer.from_str(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise DovetailError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from exc
    except Exception as exc:  # the Rust tokenizer raises a bare Exception on a bad file
        raise DovetailError(f"{path} is corrupt ({str(exc).splitlines()[0]}); re-export the artifact") from exc
    tokenizer.encode_special_tokens = plain
    return tokenizer


def decode_utf8(data: bytes, where: str) -> str:
    """Prompt bytes as text; anything that is not UTF-8 is one clear error naming where it came from."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DovetailError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc


class Tokenizer:
    """Encodes prompts; what users type is text, only the chat template's own markers are control tokens.

    Two instances of the same tokenizer: one that turns special-token strings into control tokens
    (the template's markers, raw prompts), one that encodes them as the characters they are (message
    content), so `<|im_end|>` typed in a message cannot close its turn and forge another.
    """

    def __init__(self, folder: Path, chat_template: str | None, special_tokens: dict):
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise DovetailError(f"{path} is missing; re-export the artifact")
        self.tokenizer, self.plain = _load(path, plain=False), _load(path, plain=True)
        specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        self.special_pattern = (re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
                                if specials else None)
        self.special_tokens = special_tokens
        self.template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
            try:
                self.template = env.from_string(chat_template)
            except TemplateSyntaxError as exc:
                raise DovetailError(f"the artifact's chat template does not parse (line {exc.lineno}: {exc.message}); "
                                    "re-export the artifact, or pass --raw") from exc

    def encode(self, text: str, add_special_tokens: bool = True, special: bool = True) -> list[int]:
        """`special`: special-token strings in `text` become control tokens (a raw prompt is the user's own template)."""
        tokenizer = self.tokenizer if special else self.plain
        return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict], special: bool = False) -> list[int]:
        """Render the chat template with a generation prompt and encode it.

        Special-token strings inside message content are swapped for unique placeholders before
        rendering and encoded as plain text after, unless `special` opts in to them as control tokens.
        """
        if self.template is None:
            raise DovetailError("this model has no chat template; pass --raw to send the prompt as it is")
        found: list[str] = []
        marker = uuid.uuid4().hex
        if not special and self.special_pattern:
            def hide(match: re.Match) -> str:
                found.append(match.group())
                return f"{marker}{len(found) - 1}{marker}"

            messages = [{**m, "content": self.special_pattern.sub(hide, m["content"])}
                        if isinstance(m.get("content"), str) else m for m in messages]
        try:
            text = self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except TemplateError as exc:
            raise DovetailError(f"the chat template refused these messages: {exc}") from exc
        ids = []
        # Split on the placeholders: even pieces are the rendered template, odd ones a hidden string's index.
        for i, piece in enumerate(re.split(f"{marker}(\\d+){marker}", text)):
            template = i % 2 == 0
            ids += self.encode(piece if template else found[int(piece)], add_special_tokens=False, special=template)
        return ids


class StreamDecoder:
    """Turns accepted token ids into printable text pieces without splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed :], len(text)
        return piece

    def flush(self) -> str:
        """What is still held back at the end (a character cut short by the last token), so the streamed
        pieces add up to exactly `decode(all ids)`."""
        text = self.tokenizer.decode(self.ids)
        piece, self.printed = text[self.printed :], len(text)
        return piece
