"""Layouts: detecting a row's layout and turning it into an Example (turns, prompt and response text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slapcli.io.layouts import LAYOUTS, ROLES, Example, FieldError, Turn, detect_layout, parse_example

LAYOUT_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "layouts"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (LAYOUT_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]


# --- detect_layout -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_detect_layout_on_every_sample_file(layout: str) -> None:
    rows = _rows(f"{layout}.jsonl")
    assert 5 <= len(rows) <= 8
    assert {detect_layout(r) for r in rows} == {layout}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o"}, "alpaca"),  # input is optional
        ({"conversations": [], "text": "t"}, "sharegpt"),  # most specific shape first
        ({"messages": [], "instruction": "i", "output": "o"}, "openai"),
        ({"conversations": [], "messages": []}, "sharegpt"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"prompt": "p", "response": "r"}, "prompt_response"),
        ({"prompt": "p", "completion": "c", "response": "r"}, "prompt_completion"),
        ({"text": "t", "id": 3}, "text"),
        ({"instruction": "i", "text": "t"}, "text"),  # alpaca needs both instruction and output
        ({"conversations": "not a list"}, None),
        ({"messages": {"role": "user"}}, None),
        ({"instruction": "i"}, None),
        ({"prompt": "p"}, None),
        ({"foo": 1, "bar": 2}, None),
        ({}, None),
        ([{"instruction": "i", "output": "o"}], None),
        ("text", None),
        (42, None),
        (None, None),
    ],
)
def test_detect_layout(row: object, expected: str | None) -> None:
    assert detect_layout(row) == expected


# --- parse_example: each layout ------------------------------------------------------------------------------------


def test_alpaca_without_input() -> None:
    ex = parse_example({"instruction": "Name a fruit.", "input": "", "output": "Apple."}, "alpaca")
    assert ex == Example((Turn("user", "Name a fruit."), Turn("assistant", "Apple.")))
    assert ex.prompt_text == "Name a fruit."
    assert ex.response_text == "Apple."
    assert ex.full_text == "Name a fruit.\n\nApple."


def test_alpaca_with_input_and_extra_fields() -> None:
    row = {"id": "a2", "source": "x", "instruction": "Translate.", "input": "The cat.", "output": "Le chat."}
    ex = parse_example(row, "alpaca")
    assert ex.prompt_text == "Translate.\n\nThe cat."
    assert ex.response_text == "Le chat."


@pytest.mark.parametrize("extra", [None, "   ", "\n"])
def test_alpaca_blank_or_null_input_is_ignored(extra: str | None) -> None:
    row = {"instruction": "Say hi.", "input": extra, "output": "Hi."}
    assert parse_example(row, "alpaca").prompt_text == "Say hi."


def test_alpaca_sample_file() -> None:
    rows = _rows("alpaca.jsonl")
    examples = [parse_example(r, "alpaca") for r in rows]
    assert examples[1].prompt_text == "Translate the sentence into French.\n\nThe cat sleeps on the sofa."
    assert examples[1].response_text == "Le chat dort sur le canapé."
    assert examples[2].response_text.startswith("def factorial(n):\n")


def test_sharegpt_multi_turn_with_system() -> None:
    row = _rows("sharegpt.jsonl")[0]
    ex = parse_example(row, "sharegpt")
    assert [t.role for t in ex.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert ex.prompt_text == "You are a concise assistant.\n\nWhat is the capital of Australia?\n\nAnd its population?"
    # Every assistant turn is response, in order.
    assert ex.response_text == "Canberra.\n\nAbout 460,000 people."
    assert ex.full_text == "\n\n".join(t["value"] for t in row["conversations"])


@pytest.mark.parametrize(
    ("raw_role", "role"),
    [
        ("human", "user"), ("HUMAN", "user"), ("user", "user"), ("prompter", "user"),
        ("gpt", "assistant"), ("GPT", "assistant"), ("assistant", "assistant"), ("bot", "assistant"),
        ("model", "assistant"), ("chatgpt", "assistant"), ("System", "system"),
    ],
)
def test_roles_are_normalised(raw_role: str, role: str) -> None:
    row = {"conversations": [{"from": raw_role, "value": "x"}, {"from": "gpt", "value": "answer"}]}
    assert parse_example(row, "sharegpt").turns[0].role == role
    row = {"messages": [{"role": raw_role, "content": "x"}, {"role": "assistant", "content": "answer"}]}
    assert parse_example(row, "openai").turns[0].role == role


def test_openai_multi_turn() -> None:
    ex = parse_example(_rows("openai.jsonl")[2], "openai")
    assert ex.prompt_text == "Name a primary colour.\n\nAnother one?"
    assert ex.response_text == "Red.\n\nBlue."


def test_openai_content_parts() -> None:
    ex = parse_example(_rows("openai.jsonl")[1], "openai")
    assert ex.turns[0] == Turn("user", "Describe this function: def add(a, b): return a + b")
    assert ex.response_text == "It takes two values and returns their sum."


def test_openai_content_parts_keep_only_text_parts() -> None:
    content = [
        {"type": "text", "text": "What is in "},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"text": "this picture?"},  # no type: taken as text
    ]
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "A cat."}]}
    assert parse_example(row, "openai").prompt_text == "What is in this picture?"


@pytest.mark.parametrize("bad_text", [None, 5, {"a": 1}])
def test_openai_content_part_with_non_string_text(bad_text: object) -> None:
    content = [{"type": "text", "text": "Hello"}, {"type": "text", "text": bad_text}]
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Hi."}]}
    try:
        ex = parse_example(row, "openai")
    except FieldError as e:
        assert e.field.startswith("messages[0].content")
    else:
        assert ex.prompt_text == "Hello", "a non-string text part must not leak str(value) into the text"


def test_prompt_completion_and_prompt_response() -> None:
    ex = parse_example(_rows("prompt_completion.jsonl")[1], "prompt_completion")
    assert (ex.prompt_text, ex.response_text) == ("Q: What is 12 times 12?\nA:", " 144")
    ex = parse_example(_rows("prompt_response.jsonl")[1], "prompt_response")
    assert (ex.prompt_text, ex.response_text) == ("What does HTTP stand for?", "HyperText Transfer Protocol.")


def test_text_is_all_response() -> None:
    row = _rows("text.jsonl")[0]
    ex = parse_example(row, "text")
    assert ex.prompt_text == ""
    assert ex.response_text == row["text"] == ex.full_text


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_sample_row_parses(layout: str) -> None:
    for row in _rows(f"{layout}.jsonl"):
        ex = parse_example(row, layout)
        assert ex.response_text.strip()


# --- parse_example: errors name the field --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "layout", "field", "message"),
    [
        ({"input": "", "output": "o"}, "alpaca", "instruction", "missing"),
        ({"instruction": None, "output": "o"}, "alpaca", "instruction", "missing"),
        ({"instruction": "i"}, "alpaca", "output", "missing"),
        ({"instruction": "i", "output": ""}, "alpaca", "output", "no response"),
        ({"instruction": "i", "output": " \n "}, "alpaca", "output", "no response"),
        ({"instruction": "i", "output": 3}, "alpaca", "output", "expected a string, got a number"),
        ({"instruction": ["i"], "output": "o"}, "alpaca", "instruction", "expected a string, got an array"),
        ({"instruction": "i", "input": 5, "output": "o"}, "alpaca", "input", "expected a string, got a number"),
        ({"conversations": "hi"}, "sharegpt", "conversations", "missing or not a list"),
        ({"conversations": []}, "sharegpt", "conversations", "empty conversation"),
        ({"conversations": ["hi"]}, "sharegpt", "conversations[0]", "expected an object, got a string"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "sharegpt",
         "conversations[1].from", "unknown role 'robot'"),
        ({"conversations": [{"from": "human", "value": "q"}, {"value": "a"}]}, "sharegpt",
         "conversations[1].from", "missing or not a string"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 7}]}, "sharegpt",
         "conversations[1].value", "missing or not a string"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "sharegpt",
         "conversations[1].value", "missing or not a string"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", "conversations", "no response"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, "sharegpt",
         "conversations", "no response"),
        ({"messages": None}, "openai", "messages", "missing or not a list"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": 1, "content": "a"}]}, "openai",
         "messages[1].role", "missing or not a string"),
        ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}, "openai",
         "messages[0].content[0]", "expected a content part object, got a string"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "openai",
         "messages[1].content", "missing or not a string"),
        ({"prompt": "p"}, "prompt_completion", "completion", "missing"),
        ({"completion": "c"}, "prompt_completion", "prompt", "missing"),
        ({"prompt": "p", "response": ""}, "prompt_response", "response", "no response"),
        ({"prompt": "p", "response": {"a": 1}}, "prompt_response", "response",
         "expected a string or a list of messages, got an object"),
        ({"text": ""}, "text", "text", "no response"),
        ({"body": "x"}, "text", "text", "missing"),
        ([1, 2], "alpaca", "(row)", "expected a JSON object, got an array"),
        ("x", "sharegpt", "(row)", "expected a JSON object, got a string"),
        (None, "text", "(row)", "expected a JSON object, got null"),
    ],
)
def test_field_errors(row: object, layout: str, field: str, message: str) -> None:
    with pytest.raises(FieldError) as info:
        parse_example(row, layout)
    assert info.value.field == field
    assert message in info.value.message
    assert str(info.value) == info.value.message
    assert isinstance(info.value, ValueError)


def test_unknown_layout_name() -> None:
    with pytest.raises(ValueError, match="unknown layout 'yaml'") as info:
        parse_example({"text": "x"}, "yaml")
    assert not isinstance(info.value, FieldError)


# --- properties ----------------------------------------------------------------------------------------------------

FIELD_NAMES = [
    "instruction", "input", "output", "conversations", "messages", "from", "value", "role", "content",
    "prompt", "completion", "response", "text", "type", "system", "id",
]
ROLE_NAMES = ["human", "gpt", "user", "assistant", "system", "model", "robot", "GPT", ""]

_keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.sampled_from(ROLE_NAMES), st.sampled_from(["text", "image_url"]),
)
json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(_keys, children, max_size=6),
    ),
    max_leaves=15,
)
# Rows that look close to a real layout, so the deeper branches of the parsers are exercised too.
_turn = st.fixed_dictionaries(
    {},
    optional={"from": json_values | st.sampled_from(ROLE_NAMES), "role": json_values | st.sampled_from(ROLE_NAMES),
              "value": json_values | st.text(max_size=10), "content": json_values | st.text(max_size=10),
              "type": st.sampled_from(["text", "image_url"])},
)
near_rows = st.fixed_dictionaries(
    {},
    optional={name: json_values | st.text(max_size=10) | st.lists(_turn | json_values, max_size=4)
              for name in FIELD_NAMES},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, near_rows))
def test_parse_example_only_raises_field_error(row: object) -> None:
    assert detect_layout(row) in (None, *LAYOUTS)
    for layout in LAYOUTS:
        try:
            ex = parse_example(row, layout)
        except FieldError as e:
            assert isinstance(e.field, str) and e.field
            assert isinstance(e.message, str) and e.message
        else:
            assert isinstance(ex, Example)
            assert all(t.role in ROLES and isinstance(t.text, str) for t in ex.turns)
            assert ex.response_text.strip()


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_detect_layout_never_raises(row: object) -> None:
    layout = detect_layout(row)
    assert layout is None or layout in LAYOUTS
    if layout is not None:
        assert isinstance(row, dict)
