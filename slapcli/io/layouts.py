"""Row layouts: how one JSON object holds a prompt and a response.

Every layout is turned into the same `Example`: a list of turns, where every assistant turn counts as
response (multi-turn rows are trained on every assistant turn, as chat trainers do).

What is prompt and what is response, in every layout:
- a row's `system` field and its `tools` / `functions` schemas open the prompt (as system turns);
- `user` turns and tool results (`tool`, `function`, ShareGPT `observation`) are prompt;
- assistant turns are response, their text followed by their tool calls (OpenAI `tool_calls`, the legacy
  `function_call`, ShareGPT `function_call` turns): calling a tool is model output, trained on like text;
- an assistant turn with `weight` / `loss_weight` 0 (or `train: false`) is not trained on: it stays in the
  conversation with the role `assistant_context` (prompt, not response), as do assistant turns on the prompt
  side of a pair (a preference row's or a prompt/completion row's prompt);
- a preference row is its prompt and its chosen answer; the rejected one is only checked to be there.
Message `content` may be a string or a list of typed parts: text parts (`text` or `value` key) are joined in
order; other parts (images, audio, files) carry no text to score and are counted in `Example.non_text_parts`,
as are media columns beside the text. Huge turns and rows are clipped to what the models can read
(CLIP_CHARS, ROW_CLIP_CHARS); the row itself is exported whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

LAYOUTS = ("alpaca", "sharegpt", "openai", "preference", "prompt_completion", "prompt_response", "text")

# The role of an assistant turn that is not trained on (weight 0): part of the prompt, with its own header.
CONTEXT_ROLE = "assistant_context"
ROLES = ("system", "user", "tool", "assistant", CONTEXT_ROLE)

ROLE_ALIASES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system role
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "function_call": "assistant",  # ShareGPT tool calling: the model's call is model output
    "tool": "tool",
    "function": "tool",  # OpenAI's legacy name for a tool result
    "observation": "tool",  # ShareGPT tool calling: the tool's answer, input like a user turn
    "ipython": "tool",  # Llama 3's tool-result role
    "function_response": "tool",
    "tool_response": "tool",
    "tool_call": "assistant",
}

TEXT_PART_TYPES = ("text", "input_text", "output_text")  # chat completions, and the Responses API's names
MEDIA_FIELDS = ("images", "videos", "audios", "image", "video", "audio")  # media beside the text: counted too
_MEDIA_FIELD_SET = frozenset(MEDIA_FIELDS)
TOOLS_FIELDS = ("tools", "functions")  # a row's tool schemas, in the prompt
SYSTEM_FIELD = "system"
# Per message: a weight of 0 (OpenAI, LLaMA-Factory, axolotl) or a training flag of false (axolotl's `train`) marks
# a turn that is not trained on.
WEIGHT_KEYS = ("weight", "loss_weight", "train", "training")

# A turn longer than this is cut to its first and last CLIP_CHARS // 2 characters before anyone tokenizes it:
# the proxy reads at most --max-tokens (1,024 by default) and the encoder 256, so one 20 MB row would otherwise
# take gigabytes for nothing. The head is what the encoder and a long answer's scoring read, the tail what a
# prompt too long for the window keeps (the proxy keeps a prompt's end). Exported rows are never cut.
CLIP_CHARS = 1 << 16
# Turns past this many characters on either side of the first response are dropped (the proxy's window and the
# encoder's never reach them), so a row of thousands of turns is bounded as well.
ROW_CLIP_CHARS = 4 * CLIP_CHARS

# The prompt_response layout under the names public sets use (GSM8K's question/answer, MetaMathQA's query/response,
# MATH's problem/solution); Alpaca's family (Dolly: instruction/context/response) likewise.
PAIR_FIELDS = (("prompt", "response"), ("question", "answer"), ("query", "response"), ("problem", "solution"),
               ("input", "output"))
ALPACA_ANSWERS = ("output", "response")  # and Dolly's `context` for `input`

# Preference rows: the (chosen, rejected) field names (TRL and most sets; OpenAI's preference fine-tuning), and
# where the prompt is when there is no `prompt` field: Alpaca-style rows (LLaMA-Factory's `instruction` +
# `input`; orca_dpo_pairs' `question`; distilabel's `input`) and LLaMA-Factory's ShareGPT-style `conversations`.
PREFERENCE_PAIRS = (("chosen", "rejected"), ("preferred_output", "non_preferred_output"))
PREFERENCE_PROMPT_FIELDS = ("prompt", "instruction", "question", "input", "conversations", "messages")

# Field mapping (`--fields`): the canonical names a user maps their columns to, as in LLaMA-Factory's
# dataset_info.json `columns`.
FIELD_ROLES = ("prompt", "query", "response", "system", "tools", "history", "messages", "chosen", "rejected")


class FieldError(ValueError):
    """A row does not fit its layout; `field` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    text: str


@dataclass(frozen=True)
class Example:
    turns: tuple[Turn, ...]
    non_text_parts: int = 0  # content parts that hold no text (images, audio, files): not scored, counted

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
    if any(chosen in row and rejected in row for chosen, rejected in PREFERENCE_PAIRS):
        return "preference"  # before messages: preference sets often carry the chosen chat as `messages` too
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if isinstance(row.get("messages"), list):
        return "openai"
    if "instruction" in row and any(k in row for k in ALPACA_ANSWERS):
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if _pair_fields(row) is not None:
        return "prompt_response"
    if "text" in row:
        return "text"
    return None


def _pair_fields(row: Mapping) -> tuple[str, str] | None:
    """The first (prompt, response) name pair of PAIR_FIELDS that the row has both fields of."""
    return next(((p, r) for p, r in PAIR_FIELDS if p in row and r in row), None)


def has_text(text: str) -> bool:
    """Whether `text` holds anything visible: whitespace and zero-width or format characters do not count."""
    text = text.strip()
    if text[:1].isalnum():
        return True  # the common case, decided without looking at every character
    return any(not c.isspace() and unicodedata.category(c) not in ("Cf", "Cc", "Zs") for c in text)


def _clip(text: str) -> str:
    if len(text) <= CLIP_CHARS:
        return text
    half = CLIP_CHARS // 2
    # The cut part's digest stays in the text: two rows that differ only there are no exact duplicates.
    digest = hashlib.blake2b(text[half:-half].encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{text[:half]}\n[… {len(text) - 2 * half:,} characters cut, blake2b {digest} …]\n{text[-half:]}"


def _clip_row(turns: list[Turn]) -> list[Turn]:
    """Each turn clipped; and turns beyond ROW_CLIP_CHARS before or after the first response dropped, all but the
    first (whose head the encoder reads). A row's own turns, only fewer and shorter: what the models can see."""
    lengths = [len(t.text) for t in turns]
    if max(lengths) <= CLIP_CHARS and sum(lengths) <= 2 * ROW_CLIP_CHARS:
        return turns  # the common case: nothing to cut
    turns = [Turn(t.role, _clip(t.text)) for t in turns]
    if sum(len(t.text) for t in turns) <= 2 * ROW_CLIP_CHARS:
        return turns
    first = next(i for i, t in enumerate(turns) if t.role == "assistant")
    before, after, size = [], [], 0
    for turn in reversed(turns[1:first]):  # the prompt's end, the part the proxy keeps of a long prompt
        size += len(turn.text)
        if size > ROW_CLIP_CHARS:
            break
        before.append(turn)
    size = 0
    for turn in turns[first:]:
        if after and size + len(turn.text) > ROW_CLIP_CHARS:
            break
        size += len(turn.text)
        after.append(turn)
    return turns[:1] + before[::-1] + after if first > 0 else after


class _Parts:
    """Counts the non-text content parts met while parsing one row."""

    def __init__(self) -> None:
        self.non_text = 0


def json_type(value: Any) -> str:
    """What a value is, in the words of JSON (a user wrote JSON, not Python: `null`, not `NoneType`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    for kinds, name in ((str, "a string"), ((int, float), "a number"), (list, "an array"), (Mapping, "an object")):
        if isinstance(value, kinds):
            return name
    return type(value).__name__  # from Parquet or Arrow: bytes, a date, ...


def _string_field(row: Mapping, field: str, *, required: bool = True) -> str:
    if field not in row or row[field] is None:
        if required:
            raise FieldError(field, "missing")
        return ""
    value = row[field]
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {json_type(value)}")
    return value


def _content_text(value: Any, where: str, parts: _Parts) -> str:
    """A message's text: a string, or the text parts of a list of typed parts joined in order."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise FieldError(where, "missing or not a string")
    texts: list[str] = []
    for j, part in enumerate(value):
        if not isinstance(part, Mapping):
            raise FieldError(f"{where}[{j}]", f"expected a content part object, got {json_type(part)}")
        kind = part.get("type")
        key = "text" if "text" in part else "value" if "value" in part else None
        if kind is not None and kind not in TEXT_PART_TYPES:
            parts.non_text += 1  # an image, audio clip or file: no text to score
            continue
        if key is None:
            if kind is None:
                raise FieldError(f"{where}[{j}]", "a content part with no type and no text or value")
            raise FieldError(f"{where}[{j}].text", "missing")
        text = part[key]
        if isinstance(text, Mapping) and isinstance(text.get("value"), str):
            text = text["value"]  # the Assistants API nests it: {"text": {"value": ..., "annotations": []}}
        if not isinstance(text, str):
            raise FieldError(f"{where}[{j}].{key}", f"expected a string, got {json_type(text)}")
        texts.append(text)
    return "".join(texts)


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _tool_calls_text(item: Mapping, where: str) -> str:
    """An assistant message's tool calls as text, one JSON object per call (name and arguments)."""
    pieces: list[str] = []
    calls = item.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise FieldError(f"{where}.tool_calls", f"expected a list, got {json_type(calls)}")
        for j, call in enumerate(calls):
            if not isinstance(call, Mapping):
                raise FieldError(f"{where}.tool_calls[{j}]", f"expected an object, got {json_type(call)}")
            function = call.get("function", call)
            pieces.append(_json_text(function))
    legacy = item.get("function_call")
    if legacy is not None:
        pieces.append(_json_text(legacy))
    return "\n".join(pieces)


def _is_untrained(item: Mapping, where: str) -> bool:
    for key in WEIGHT_KEYS:
        weight = item.get(key)
        if weight is None:
            continue
        if not isinstance(weight, (int, float)):  # a bool is an int: false is 0
            raise FieldError(f"{where}.{key}", f"expected a number or true/false, got {json_type(weight)}")
        return weight == 0
    return False


def _message_keys(items: list, default: tuple[str, str]) -> tuple[str, str]:
    """(role key, text key) of a message list: ShareGPT's from/value or OpenAI's role/content, whichever it uses."""
    first = next((item for item in items if isinstance(item, Mapping)), None)
    if first is None:
        return default
    if "from" in first and "role" not in first:
        return "from", "value"
    if "role" in first and "from" not in first:
        return "role", "content"
    return default


def _messages(items: list, field: str, parts: _Parts, default_keys: tuple[str, str]) -> list[Turn]:
    role_key, text_key = _message_keys(items, default_keys)
    turns: list[Turn] = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, Mapping):
            raise FieldError(where, f"expected an object, got {json_type(item)}")
        role_raw = item.get(role_key)
        if not isinstance(role_raw, str):
            raise FieldError(f"{where}.{role_key}", "missing or not a string")
        role = ROLE_ALIASES.get(role_raw.lower())
        if role is None:
            raise FieldError(f"{where}.{role_key}", f"unknown role {role_raw!r}")
        calls = _tool_calls_text(item, where) if role == "assistant" else ""
        content = item.get(text_key)
        if role == "tool" and isinstance(content, Mapping):
            content = _json_text(content)  # a tool result given as a JSON object
        if content is None and calls:
            text = calls  # OpenAI: a message that only calls tools has content null
        else:
            text = _content_text(content, f"{where}.{text_key}", parts)
            text = "\n".join(t for t in (text, calls) if t)
        if role == "assistant" and _is_untrained(item, where):
            role = CONTEXT_ROLE
        turns.append(Turn(role, text))
    return turns


def _context_turns(row: Mapping, system_field: str | None = SYSTEM_FIELD,
                   tools_fields: tuple[str, ...] = TOOLS_FIELDS) -> list[Turn]:
    """The row-level system prompt and tool schemas, which open the prompt."""
    turns: list[Turn] = []
    if system_field is not None and row.get(system_field) is not None:
        system = row[system_field]
        if not isinstance(system, str):
            raise FieldError(system_field, f"expected a string, got {json_type(system)}")
        if system.strip():
            turns.append(Turn("system", system))
    for name in tools_fields:
        tools = row.get(name)
        if tools is None or (tools.strip() in ("", "[]", "{}", "null") if isinstance(tools, str) else not tools):
            continue  # no tools (LLaMA-Factory writes "[]" for a row without any)
        if not isinstance(tools, (str, list, Mapping)):
            raise FieldError(name, f"expected a list of tool schemas or a JSON string, got {json_type(tools)}")
        turns.append(Turn("system", _json_text(tools)))
    return turns


def _side(value: Any, field: str, role: str, parts: _Parts) -> list[Turn]:
    """One side of a pair (prompt, completion, chosen): a string, one message, or a list of messages."""
    if isinstance(value, str):
        return [Turn(role, value)]
    if isinstance(value, list):
        if not value:
            raise FieldError(field, "empty list of messages")
        return _messages(value, field, parts, ("role", "content"))
    if value is None:
        raise FieldError(field, "missing")
    raise FieldError(field, f"expected a string or a list of messages, got {json_type(value)}")


def _history(row: Mapping, field: str) -> list[Turn]:
    """LLaMA-Factory's `history`: earlier [prompt, response] pairs, before the row's own prompt."""
    history = row.get(field)
    if history is None:
        return []
    if not isinstance(history, list):
        raise FieldError(field, f"expected a list of [prompt, response] pairs, got {json_type(history)}")
    turns: list[Turn] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise FieldError(f"{field}[{i}]", "expected a [prompt, response] pair of strings")
        turns += [Turn("user", pair[0]), Turn("assistant", pair[1])]
    return turns


_TRANSCRIPT = re.compile(r"\n\n(Human|Assistant): ")


def _transcript(text: str) -> list[Turn]:
    """Anthropic HH-style text ("\\n\\nHuman: ...\\n\\nAssistant: ..."), or the whole text as response."""
    pieces = _TRANSCRIPT.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        return [Turn("assistant", text)]
    return [Turn("user" if who == "Human" else "assistant", said) for who, said in zip(pieces[1::2], pieces[2::2],
                                                                                        strict=True)]


def _as_context(turns: list[Turn]) -> list[Turn]:
    """Assistant turns on the prompt side of a pair are context, not trained on (as TRL and DPO treat them)."""
    return [Turn(CONTEXT_ROLE, t.text) if t.role == "assistant" else t for t in turns]


def _preference_prompt(row: Mapping, parts: _Parts) -> list[Turn]:
    """A preference row's prompt, wherever the common formats keep it (see PREFERENCE_PROMPT_FIELDS)."""
    if isinstance(row.get("input"), Mapping):  # OpenAI preference fine-tuning: {"input": {"messages", "tools"}}
        given = row["input"]
        if not isinstance(given.get("messages"), list):
            raise FieldError("input.messages", "missing or not a list")
        return _context_turns(given, None) + _messages(given["messages"], "input.messages", parts, ("role", "content"))
    for name in PREFERENCE_PROMPT_FIELDS:
        if row.get(name) is None:
            continue
        turns = _side(row[name], name, "user", parts)
        extra = _string_field(row, "input", required=False) if name == "instruction" else ""
        if extra.strip() and len(turns) == 1:
            turns = [Turn("user", f"{turns[0].text}\n\n{extra}")]  # Alpaca-style: instruction, then input
        return turns
    return []


def _preference(row: Mapping, parts: _Parts, prompt_turns: list[Turn], chosen: str = "chosen",
                rejected: str = "rejected") -> list[Turn]:
    """Pruned by the chosen answer; the rejected one is only checked to be there (export keeps it as it is)."""
    if row.get(rejected) is None:
        raise FieldError(rejected, "missing")
    if not isinstance(row[rejected], (str, list, Mapping)):
        raise FieldError(rejected, f"expected a string or a list of messages, got {type(row[rejected]).__name__}")
    value = row.get(chosen)
    if isinstance(value, str) and not prompt_turns:
        return _transcript(value)
    if isinstance(value, Mapping):
        value = [value]  # LLaMA-Factory: one message, {"from": "gpt", "value": ...}
    answer = _side(value, chosen, "assistant", parts)
    if any(t.role not in ("assistant", CONTEXT_ROLE) for t in answer):
        return answer  # the chosen conversation carries its own prompt (and repeats the `prompt` field)
    return _as_context(prompt_turns) + answer


def _require_response(turns: list[Turn], field: str, parts: _Parts | None = None) -> Example:
    if not any(t.role == "assistant" and has_text(t.text) for t in turns):
        raise FieldError(field, "no response: the row has no non-empty assistant/output text")
    return Example(tuple(_clip_row(turns)), parts.non_text if parts else 0)


def _conversation(row: Mapping, field: str, keys: tuple[str, str]) -> Example:
    if not isinstance(row.get(field), list):
        raise FieldError(field, "missing or not a list")
    parts = _Parts()
    turns = _messages(row[field], field, parts, keys)
    if not turns:
        raise FieldError(field, "empty conversation")
    return _require_response(_context_turns(row) + turns, field, parts)


def _with_media(example: Example, row: Mapping) -> Example:
    """Count a row's media columns (LLaMA-Factory's `images`, LLaVA's `image`) with its non-text parts."""
    if not row.keys() & _MEDIA_FIELD_SET:
        return example
    media = sum(len(v) if isinstance(v, list) else 1 for k in MEDIA_FIELDS if (v := row.get(k)) not in (None, "", []))
    return replace(example, non_text_parts=example.non_text_parts + media) if media else example


def parse_example(row: Any, layout: str) -> Example:
    """Turn one JSON row into an Example, or raise FieldError naming the field that is wrong."""
    if not isinstance(row, Mapping):
        raise FieldError("(row)", f"expected a JSON object, got {json_type(row)}")
    return _with_media(_parse_layout(row, layout), row)


def _parse_layout(row: Mapping, layout: str) -> Example:
    if layout == "alpaca":
        instruction = _string_field(row, "instruction")
        extra = _string_field(row, "context" if "context" in row and "input" not in row else "input", required=False)
        prompt = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        answer = "response" if "response" in row and "output" not in row else "output"
        turns = [*_context_turns(row), *_history(row, "history"), Turn("user", prompt),
                 Turn("assistant", _string_field(row, answer))]
        return _require_response(turns, answer)
    if layout == "sharegpt":
        return _conversation(row, "conversations", ("from", "value"))
    if layout == "openai":
        return _conversation(row, "messages", ("role", "content"))
    if layout == "preference":
        parts = _Parts()
        pair = next((p for p in PREFERENCE_PAIRS if p[0] in row), PREFERENCE_PAIRS[0])
        turns = _preference(row, parts, _preference_prompt(row, parts), *pair)
        return _require_response(_context_turns(row) + turns, pair[0], parts)
    if layout in ("prompt_completion", "prompt_response"):
        prompt, answer = ("prompt", "completion") if layout == "prompt_completion" else \
            (_pair_fields(row) or PAIR_FIELDS[0])
        parts = _Parts()
        turns = [*_context_turns(row), *_as_context(_side(row.get(prompt), prompt, "user", parts)),
                 *_side(row.get(answer), answer, "assistant", parts)]
        return _require_response(turns, answer, parts)
    if layout == "text":
        # Plain text has no prompt: all of it is trained on, so all of it is "response".
        return _require_response([Turn("assistant", _string_field(row, "text"))], "text")
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


# --- field mapping (--fields) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldMap:
    """Which of a row's fields plays which part: {canonical name: the row's field name}."""

    names: tuple[tuple[str, str], ...]

    def get(self, role: str) -> str | None:
        return dict(self.names).get(role)

    def describe(self) -> str:
        return ",".join(f"{role}={name}" for role, name in self.names)


def parse_field_map(spec: str) -> FieldMap:
    """`prompt=question,response=answer[,system=sys]` -> FieldMap; ValueError with a one-line reason."""
    names: dict[str, str] = {}
    for item in spec.split(","):
        role, sep, name = (s.strip() for s in item.partition("="))
        if not sep or not role or not name:
            raise ValueError(f"expected ROLE=FIELD, got {item.strip()!r}")
        if role not in FIELD_ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(FIELD_ROLES)}")
        if role in names:
            raise ValueError(f"{role!r} is given twice")
        names[role] = name
    return _checked_map(names)


def _checked_map(names: dict[str, str]) -> FieldMap:
    """A mapping of one shape: a pair (prompt, response), a conversation (messages), or a preference (chosen and
    rejected, after a prompt or a messages prompt)."""
    if "chosen" in names or "rejected" in names:
        if not ("chosen" in names and "rejected" in names):
            raise ValueError("a preference mapping needs both chosen and rejected")
        shape, allowed = "preference", {"prompt", "query", "messages", "history", "chosen", "rejected", "system",
                                        "tools"}
    elif ("messages" in names) == ("response" in names):
        raise ValueError("map exactly one of: response (with prompt), messages, or chosen and rejected")
    elif "messages" in names:
        shape, allowed = "messages", {"messages", "system", "tools"}
    else:
        if "prompt" not in names:
            raise ValueError("response needs a prompt field too")
        shape, allowed = "pair", {"prompt", "query", "response", "system", "tools", "history"}
    extra = sorted(set(names) - allowed)
    if extra:
        raise ValueError(f"{', '.join(extra)} cannot be combined with {shape}")
    if "prompt" in names and "messages" in names:
        raise ValueError("the prompt is either a prompt field or a messages field, not both")
    return FieldMap(tuple(names.items()))


def field_map_from_dataset_info(info: Mapping, name: str) -> FieldMap:
    """The mapping of entry `name` of a LLaMA-Factory dataset_info.json (its `formatting`, `ranking` and
    `columns`, with LLaMA-Factory's defaults); ValueError with a one-line reason."""
    entry = info.get(name)
    if not isinstance(entry, Mapping):
        known = ", ".join(sorted(k for k, v in info.items() if isinstance(v, Mapping))[:8])
        raise ValueError(f"no entry {name!r} (entries: {known}{', ...' if len(info) > 8 else ''})")
    columns = entry.get("columns") or {}
    if not isinstance(columns, Mapping):
        raise ValueError(f"entry {name!r}: columns is not an object")
    names: dict[str, str] = {}
    if entry.get("formatting", "alpaca") == "sharegpt":
        names["messages"] = columns.get("messages", "conversations")
    else:
        names["prompt"] = columns.get("prompt", "instruction")
        names["query"] = columns.get("query", "input")
        if not entry.get("ranking"):
            names["response"] = columns.get("response", "output")
        if columns.get("history"):
            names["history"] = columns["history"]
    if entry.get("ranking"):
        names["chosen"] = columns.get("chosen", "chosen")
        names["rejected"] = columns.get("rejected", "rejected")
    for role in ("system", "tools"):
        if columns.get(role):
            names[role] = columns[role]
    if not all(isinstance(v, str) and v for v in names.values()):
        raise ValueError(f"entry {name!r}: a column name is not a string")
    return _checked_map(names)


def parse_mapped(row: Any, fields: FieldMap) -> Example:
    """Like parse_example, with the row's fields named by `fields`; errors name the row's field and its role."""
    if not isinstance(row, Mapping):
        raise FieldError("(row)", f"expected a JSON object, got {json_type(row)}")
    roles = {name: role for role, name in fields.names}
    try:
        return _with_media(_parse_mapped(row, fields), row)
    except FieldError as e:
        root = re.split(r"[.\[]", e.field, maxsplit=1)[0]
        if root in roles:
            raise FieldError(e.field, f"{e.message} (mapped as {roles[root]} by --fields)") from None
        raise


def _mapped_prompt(row: Mapping, fields: FieldMap, parts: _Parts) -> list[Turn]:
    """The prompt side of a mapped row: history pairs, then the messages or the prompt (+ query) field."""
    history = _history(row, fields.get("history")) if fields.get("history") else []
    messages = fields.get("messages")
    if messages is not None:
        if not isinstance(row.get(messages), list):
            raise FieldError(messages, "missing" if row.get(messages) is None else "not a list of messages")
        if not row[messages]:
            raise FieldError(messages, "empty conversation")
        return history + _messages(row[messages], messages, parts, ("role", "content"))
    prompt = fields.get("prompt")
    if prompt is None:
        return history
    turns = _side(row.get(prompt), prompt, "user", parts)
    query = fields.get("query")
    if query is not None and _string_field(row, query, required=False).strip():
        if len(turns) != 1:
            raise FieldError(prompt, "a query field needs the prompt as one string")
        turns = [Turn("user", f"{turns[0].text}\n\n{row[query]}")]
    return history + turns


def _parse_mapped(row: Mapping, fields: FieldMap) -> Example:
    tools = fields.get("tools")
    context = _context_turns(row, fields.get("system"), (tools,) if tools else ())
    parts = _Parts()
    chosen, rejected = fields.get("chosen"), fields.get("rejected")
    if chosen is not None and rejected is not None:
        turns = _preference(row, parts, _mapped_prompt(row, fields, parts), chosen, rejected)
        return _require_response(context + turns, chosen, parts)
    turns = _mapped_prompt(row, fields, parts)
    response = fields.get("response")
    if response is None:  # a conversation: its assistant turns are the response
        field = fields.get("messages")
        assert field is not None
        return _require_response(context + turns, field, parts)
    turns = [*context, *turns, *_side(row.get(response), response, "assistant", parts)]
    return _require_response(turns, response, parts)
