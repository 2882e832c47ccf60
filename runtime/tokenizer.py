"""Tokenizer and chat template without transformers: `tokenizers` + jinja2, as HF renders them."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from dovetail_onnx.runtime.errors import DovetailError


def _raise(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, folder: Path, chat_template: str | None, special_tokens: dict):
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise DovetailError(f"{path} is missing; re-export the artifact")
        try:
            self.tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust tokenizer raises a bare Exception on a bad file
            raise DovetailError(f"{path} is corrupt ({exc}); re-export the artifact") from exc
        self.special_tokens = special_tokens
        self.template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self.template = env.from_string(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        """Render the chat template with a generation prompt and encode it (its specials are in the text)."""
        if self.template is None:
            raise DovetailError("this model has no chat template; pass --raw to send the prompt as it is")
        text = self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        return self.encode(text, add_special_tokens=False)


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
