"""Row layouts: how one JSON object holds a prompt and a response.

Every layout is turned into the same `Example`: a list of turns, where every assistant turn counts as
response (multi-turn rows are trained on every assistant turn, as chat trainers do).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LAYOUTS = ("alpaca", "sharegpt", "openai", "prompt_completion", "prompt_response", "text")

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}


class FieldError(ValueError):
    """A row does not fit its layout; `field` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Example:
    turns: tuple[Turn, ...]

    @property
    def prompt_text(self) -> str:
        return "\n\n".join(t.text for t in self.turns if t.role != "assistant")

    @property
    def response_text(self) -> str:
        return "\n\n".join(t.text for t in self.turns if t.role == "assistant")

    @property
    def full_text(self) -> str:
        """Prompt and response in conversation order: what the sentence encoder sees."""
        return "\n\n".join(t.text for t in self.turns)


def detect_layout(row: Any) -> str | None:
    """The layout a row's fields suggest, or None. Order matters: the most specific shapes first."""
    if not isinstance(row, Mapping):
        return None
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if isinstance(row.get("messages"), list):
        return "openai"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "prompt" in row and "response" in row:
        return "prompt_response"
    if "text" in row:
        return "text"
    return None


def _string_field(row: Mapping, field: str, *, required: bool = True) -> str:
    if field not in row or row[field] is None:
        if required:
            raise FieldError(field, "missing")
        return ""
    value = row[field]
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type(value).__name__}")
    return value


def _require_response(turns: list[Turn], field: str) -> Example:
    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise FieldError(field, "no response: the row has no non-empty assistant/output text")
    return Example(tuple(turns))


def _conversation(row: Mapping, field: str, role_key: str, text_key: str) -> Example:
    turns: list[Turn] = []
    for i, item in enumerate(row[field]):
        where = f"{field}[{i}]"
        if not isinstance(item, Mapping):
            raise FieldError(where, f"expected an object, got {type(item).__name__}")
        role_raw = item.get(role_key)
        if not isinstance(role_raw, str):
            raise FieldError(f"{where}.{role_key}", "missing or not a string")
        role = ROLE_ALIASES.get(role_raw.lower())
        if role is None:
            raise FieldError(f"{where}.{role_key}", f"unknown role {role_raw!r}")
        text = item.get(text_key)
        if not isinstance(text, str):
            # OpenAI content may be a list of parts; only the text parts carry training text.
            parts = text if isinstance(text, list) else None
            if parts is not None and all(isinstance(p, Mapping) and isinstance(p.get("text", ""), str)
                                         for p in parts):
                text = "".join(p.get("text", "") for p in parts if p.get("type", "text") == "text")
            else:
                raise FieldError(f"{where}.{text_key}", "missing or not a string")
        turns.append(Turn(role, text))
    if not turns:
        raise FieldError(field, "empty conversation")
    return _require_response(turns, field)


def parse_example(row: Any, layout: str) -> Example:
    """Turn one JSON row into an Example, or raise FieldError naming the field that is wrong."""
    if not isinstance(row, Mapping):
        raise FieldError("(row)", f"expected a JSON object, got {type(row).__name__}")
    if layout == "alpaca":
        instruction = _string_field(row, "instruction")
        extra = _string_field(row, "input", required=False)
        prompt = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return _require_response([Turn("user", prompt), Turn("assistant", _string_field(row, "output"))],
                                 "output")
    if layout == "sharegpt":
        if not isinstance(row.get("conversations"), list):
            raise FieldError("conversations", "missing or not a list")
        return _conversation(row, "conversations", "from", "value")
    if layout == "openai":
        if not isinstance(row.get("messages"), list):
            raise FieldError("messages", "missing or not a list")
        return _conversation(row, "messages", "role", "content")
    if layout in ("prompt_completion", "prompt_response"):
        answer = "completion" if layout == "prompt_completion" else "response"
        return _require_response([Turn("user", _string_field(row, "prompt")),
                                  Turn("assistant", _string_field(row, answer))], answer)
    if layout == "text":
        # Plain text has no prompt: all of it is trained on, so all of it is "response".
        return _require_response([Turn("assistant", _string_field(row, "text"))], "text")
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
