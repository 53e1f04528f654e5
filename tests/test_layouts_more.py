"""Layouts from fine-tuning repositories (issue 21): content parts, tool calling, weights, preference rows and
`--fields` mappings, parsed turn by turn. The whole pipeline on each fixture is in test_layouts_pipeline.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slapcli.io.layouts import (
    CLIP_CHARS,
    CONTEXT_ROLE,
    ROW_CLIP_CHARS,
    FieldError,
    Turn,
    detect_layout,
    field_map_from_dataset_info,
    has_text,
    parse_example,
    parse_field_map,
    parse_mapped,
)

LAYOUT_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "layouts"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (LAYOUT_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def roles(example) -> list[str]:
    return [t.role for t in example.turns]


# --- content parts -------------------------------------------------------------------------------------------------


def test_text_parts_join_in_order_with_text_or_value_keys() -> None:
    rows = _rows("openai_parts.jsonl")
    ex = parse_example(rows[1], "openai")
    assert ex.turns[0] == Turn("user", "Summarise: The meeting moved to Friday at noon.")
    assert ex.response_text == "The meeting is now on Friday at 12:00."
    assert ex.non_text_parts == 0


def test_non_text_parts_are_counted_not_scored() -> None:
    rows = _rows("openai_parts.jsonl")
    counts = [parse_example(r, "openai").non_text_parts for r in rows]
    assert counts == [1, 0, 1, 0, 0, 2]
    ex = parse_example(rows[5], "openai")
    assert ex.prompt_text == "How many cars are in the picture?"  # the images leave no text behind


def test_a_message_whose_parts_hold_no_text_is_empty() -> None:
    image = {"type": "image_url", "image_url": {"url": "x.png"}}
    row = {"messages": [{"role": "user", "content": "Draw a cat."}, {"role": "assistant", "content": [image]}]}
    with pytest.raises(FieldError, match="no response") as info:
        parse_example(row, "openai")
    assert info.value.field == "messages"


@pytest.mark.parametrize("part", [{"type": "text"}, {"type": "text", "text": 3}, {"image": "x"}, "plain"])
def test_malformed_parts_name_the_part(part: object) -> None:
    row = {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(FieldError) as info:
        parse_example(row, "openai")
    assert info.value.field.startswith("messages[0].content[0]")


def test_assistants_api_nested_text_value() -> None:
    content = [{"type": "text", "text": {"value": "Paris.", "annotations": []}}]
    row = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": content}]}
    assert parse_example(row, "openai").response_text == "Paris."


# --- tool calling ----------------------------------------------------------------------------------------------------


def test_openai_tool_calls_are_response_and_tool_results_are_prompt() -> None:
    row = _rows("openai_tools.jsonl")[0]
    ex = parse_example(row, "openai")
    assert roles(ex) == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(ex.turns[0].text) == row["tools"]  # the schema opens the prompt
    assert json.loads(ex.turns[2].text) == {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}
    assert ex.turns[2].text in ex.response_text
    assert "temperature_c" in ex.prompt_text and "temperature_c" not in ex.response_text


def test_text_and_tool_calls_in_one_message() -> None:
    ex = parse_example(_rows("openai_tools.jsonl")[1], "openai")
    assert roles(ex) == ["system", "system", "user", "assistant", "tool", "assistant"]
    first, call = ex.turns[3].text.split("\n")
    assert first == "Let me check."
    assert json.loads(call)["name"] == "get_weather"


def test_parallel_tool_calls_one_line_each() -> None:
    ex = parse_example(_rows("openai_tools.jsonl")[3], "openai")
    calls = ex.turns[2].text.split("\n")
    assert [json.loads(c)["arguments"] for c in calls] == ["{\"city\": \"Rome\"}", "{\"city\": \"Madrid\"}"]


def test_legacy_function_call_and_function_role() -> None:
    row = _rows("openai_tools.jsonl")[4]
    ex = parse_example(row, "openai")
    assert roles(ex) == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(ex.turns[0].text) == row["functions"]
    assert json.loads(ex.turns[2].text)["name"] == "convert_currency"


@pytest.mark.parametrize(("raw", "role"), [("tool", "tool"), ("function", "tool"), ("observation", "tool"),
                                           ("ipython", "tool"), ("function_response", "tool"),
                                           ("tool_response", "tool"), ("function_call", "assistant"),
                                           ("tool_call", "assistant"), ("developer", "system")])
def test_tool_calling_role_names(raw: str, role: str) -> None:
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": raw, "value": "x"},
                             {"from": "gpt", "value": "a"}]}
    assert parse_example(row, "sharegpt").turns[1].role == role


def test_developer_role_is_system() -> None:
    assert roles(parse_example(_rows("openai_tools.jsonl")[5], "openai")) == ["system", "user", "assistant"]


def test_sharegpt_function_call_and_observation_with_system_and_tools_fields() -> None:
    row = _rows("sharegpt_tools.jsonl")[0]
    ex = parse_example(row, "sharegpt")
    assert roles(ex) == ["system", "system", "user", "assistant", "tool", "assistant"]
    assert ex.turns[0].text == row["system"]
    assert ex.turns[1].text == row["tools"]  # a JSON string stays as it is
    assert ex.turns[3].text == row["conversations"][1]["value"]
    assert ex.response_text.startswith("{\"name\": \"convert_currency\"")


@pytest.mark.parametrize("index", [1, 2, 3])
def test_empty_system_and_tools_add_nothing(index: int) -> None:
    row = _rows("sharegpt_tools.jsonl")[index]
    ex = parse_example(row, "sharegpt")
    assert ex.turns[0].text != "" and all(t.text not in ("[]", "") for t in ex.turns)


def test_bad_tool_calls_name_the_field() -> None:
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": 5}]}
    with pytest.raises(FieldError) as info:
        parse_example(row, "openai")
    assert info.value.field == "messages[1].tool_calls"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": 5}
    with pytest.raises(FieldError) as info:
        parse_example(row, "openai")
    assert info.value.field == "tools"


# --- weights -------------------------------------------------------------------------------------------------------


def test_weight_zero_turn_is_prompt() -> None:
    ex = parse_example(_rows("openai_tools.jsonl")[2], "openai")
    assert roles(ex) == ["user", CONTEXT_ROLE, "user", "assistant"]
    assert ex.response_text == "Ciao."
    assert "Hola." in ex.prompt_text


def test_loss_weight_zero_turn_is_prompt() -> None:
    ex = parse_example(_rows("openai_parts.jsonl")[3], "openai")
    assert ex.response_text == "Seven is prime."
    assert "Four." in ex.prompt_text


def test_every_turn_weight_zero_is_no_response() -> None:
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 0}]}
    with pytest.raises(FieldError, match="no response"):
        parse_example(row, "sharegpt")


@pytest.mark.parametrize("flag", [{"train": False}, {"training": False}, {"weight": 0.0}])
def test_a_training_flag_of_false_is_prompt(flag: dict) -> None:
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "draft", **flag},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "final", "train": True}]}
    assert parse_example(row, "openai").response_text == "final"


def test_weight_must_be_a_number() -> None:
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "0"}]}
    with pytest.raises(FieldError) as info:
        parse_example(row, "openai")
    assert info.value.field == "messages[1].weight"


# --- preference ----------------------------------------------------------------------------------------------------


def test_preference_rows_are_detected_and_pruned_by_the_chosen_answer() -> None:
    rows = _rows("preference.jsonl")
    assert {detect_layout(r) for r in rows} == {"preference"}
    examples = [parse_example(r, "preference") for r in rows]
    assert [(e.prompt_text, e.response_text) for e in examples[:2]] == [
        ("Give me a synonym for 'happy'.", "Joyful."),
        ("What is the boiling point of water at sea level?", "100 °C (212 °F)."),
    ]
    # Chosen as a conversation that repeats the prompt: the prompt is not doubled.
    assert (examples[2].prompt_text, examples[2].response_text) == (rows[2]["prompt"], "`x ** 2`")
    # TRL conversational: prompt and chosen as message lists.
    assert (examples[3].prompt_text, examples[3].response_text) == ("Name the largest planet.", "Jupiter.")
    # Anthropic HH: the transcript holds the prompt.
    assert examples[4].prompt_text == "How do I boil an egg?"
    assert examples[4].response_text.startswith("Put it in boiling water")
    assert roles(examples[5]) == ["system", "user", "assistant"]
    assert all("Sad." not in e.full_text and "Mars." not in e.full_text for e in examples)  # rejected is not scored


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"prompt": "p", "chosen": "c", "rejected": None}, "rejected", "missing"),
        ({"prompt": "p", "chosen": "c", "rejected": 3}, "rejected", "expected a string or a list"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "no response"),
        ({"prompt": "p", "chosen": [], "rejected": "r"}, "chosen", "empty list"),
        ({"prompt": 4, "chosen": "c", "rejected": "r"}, "prompt", "expected a string or a list"),
    ],
)
def test_preference_errors_name_the_field(row: dict, field: str, message: str) -> None:
    with pytest.raises(FieldError, match=message) as info:
        parse_example(row, "preference")
    assert info.value.field == field


# --- zero-width and huge text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["\u200b", "\u200b\u200c\u200d", " \ufeff\u2060 ", "\u00ad", "\x00\x1b"])
def test_an_answer_of_only_invisible_characters_is_empty(answer: str) -> None:
    assert not has_text(answer)
    with pytest.raises(FieldError, match="no response"):
        parse_example({"instruction": "Say something.", "output": answer}, "alpaca")


def test_visible_text_with_zero_width_characters_is_text() -> None:
    assert has_text("\u200bok")
    assert parse_example({"instruction": "i", "output": "\u200bok"}, "alpaca").response_text == "\u200bok"


def test_a_huge_turn_is_clipped_to_its_head_and_tail_before_tokenizing() -> None:
    answer = "A" * 3_000_000 + "middle" + "Z" * 3_000_000
    prompt = "q" * (CLIP_CHARS + 1)
    ex = parse_example({"instruction": prompt, "output": answer}, "alpaca")
    assert all(len(t.text) <= CLIP_CHARS + 80 for t in ex.turns)
    assert ex.response_text.startswith("A" * (CLIP_CHARS // 2)) and ex.response_text.endswith("Z" * (CLIP_CHARS // 2))
    assert "middle" not in ex.response_text
    short = parse_example({"instruction": "q" * CLIP_CHARS, "output": "a"}, "alpaca")
    assert short.prompt_text == "q" * CLIP_CHARS  # at the limit nothing is cut
    other = parse_example({"instruction": prompt, "output": "A" * 3_000_000 + "MIDDLE" + "Z" * 3_000_000}, "alpaca")
    assert other.response_text != ex.response_text  # rows that differ only in the cut part are no duplicates


def test_a_row_of_many_turns_is_bounded_around_its_first_response() -> None:
    messages = [{"role": "system", "content": "S" * 100}]
    messages += [{"role": "user", "content": f"{i} " + "x" * 1000} for i in range(600)]
    messages += [{"role": "user", "content": "the question"}, {"role": "assistant", "content": "the answer"}]
    messages += [{"role": "user" if i % 2 else "assistant", "content": "y" * 1000} for i in range(2000)]
    ex = parse_example({"messages": messages}, "openai")
    assert sum(len(t.text) for t in ex.turns) <= 2 * ROW_CLIP_CHARS + 100
    assert ex.turns[0].text == "S" * 100  # the head the encoder reads
    texts = [t.text for t in ex.turns]
    assert texts.index("the question") + 1 == texts.index("the answer")  # the prompt's end and the first response
    assert ex.response_text.startswith("the answer")


# --- field mapping -------------------------------------------------------------------------------------------------


def test_mapped_prompt_response_system() -> None:
    fields = parse_field_map("prompt=ask,response=reply,system=persona")
    rows = _rows("mapped.jsonl")
    ex = parse_mapped(rows[0], fields)
    assert ex.turns == (Turn("system", "You are a chemistry tutor."),
                        Turn("user", "What is the chemical symbol for gold?"), Turn("assistant", "Au."))
    assert roles(parse_mapped(rows[1], fields)) == ["user", "assistant"]  # empty persona: no system turn
    assert roles(parse_mapped(rows[3], fields)) == ["user", "assistant"]  # no persona field at all


def test_mapped_query_history_and_tools() -> None:
    fields = parse_field_map("prompt=q,query=ctx,response=a,history=past,tools=fns")
    row = {"q": "Translate.", "ctx": "chat", "a": "Katze.", "past": [["Hund?", "Dog."]], "fns": [{"name": "f"}]}
    ex = parse_mapped(row, fields)
    assert roles(ex) == ["system", "user", "assistant", "user", "assistant"]
    assert ex.turns[3].text == "Translate.\n\nchat"
    assert ex.response_text == "Dog.\n\nKatze."


def test_mapped_messages_and_preference() -> None:
    row = {"dialog": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "sys": "be kind"}
    ex = parse_mapped(row, parse_field_map("messages=dialog,system=sys"))
    assert roles(ex) == ["system", "user", "assistant"]
    row = {"question": "2+2?", "good": "4", "bad": "5"}
    ex = parse_mapped(row, parse_field_map("prompt=question,chosen=good,rejected=bad"))
    assert (ex.prompt_text, ex.response_text) == ("2+2?", "4")


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"question": "q"}, "answer", "missing (mapped as response by --fields)"),
        ({"answer": "a"}, "question", "missing (mapped as prompt by --fields)"),
        ({"question": "q", "answer": ""}, "answer", "no response"),
        ({"question": "q", "answer": "a", "persona": 3}, "persona", "mapped as system"),
        ({"question": "q", "answer": 3}, "answer", "expected a string or a list of messages"),
    ],
)
def test_mapped_errors_name_the_row_field_and_its_role(row: dict, field: str, message: str) -> None:
    with pytest.raises(FieldError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_mapped(row, parse_field_map("prompt=question,response=answer,system=persona"))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("prompt=q", "exactly one of"),
        ("response=a", "needs a prompt"),
        ("prompt=q,response=a,answer=b", "unknown role 'answer'"),
        ("prompt=q,response=a,prompt=z", "given twice"),
        ("prompt=q,response", "expected ROLE=FIELD"),
        ("prompt=,response=a", "expected ROLE=FIELD"),
        ("messages=m,response=a,prompt=q", "exactly one of"),
        ("chosen=c", "needs both chosen and rejected"),
        ("messages=m,history=h", "cannot be combined"),
    ],
)
def test_bad_field_maps(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_field_map(spec)


@pytest.mark.parametrize(("row", "prompt", "response"), [
    # LLaMA-Factory's Alpaca-style preference data
    ({"instruction": "Translate.", "input": "cat", "chosen": "chat", "rejected": "chien"}, "Translate.\n\ncat", "chat"),
    # orca_dpo_pairs: system and question
    ({"system": "Be exact.", "question": "2+2?", "chosen": "4", "rejected": "5"}, "Be exact.\n\n2+2?", "4"),
    # distilabel: the prompt in `input`
    ({"input": "Name a fruit.", "chosen": "Apple.", "rejected": "Carrot."}, "Name a fruit.", "Apple."),
    # LLaMA-Factory's ShareGPT-style preference data: chosen and rejected are single messages
    ({"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello."},
      "rejected": {"from": "gpt", "value": "Go away."}}, "Hi?", "Hello."),
    # OpenAI preference fine-tuning
    ({"input": {"messages": [{"role": "user", "content": "Sky colour?"}], "tools": [{"name": "t"}]},
      "preferred_output": [{"role": "assistant", "content": "Blue."}],
      "non_preferred_output": [{"role": "assistant", "content": "Green."}]}, '[{"name": "t"}]\n\nSky colour?', "Blue."),
])
def test_preference_prompts_wherever_the_formats_keep_them(row: dict, prompt: str, response: str) -> None:
    assert detect_layout(row) == "preference"
    ex = parse_example(row, "preference")
    assert (ex.prompt_text, ex.response_text) == (prompt, response)


def test_assistant_turns_on_the_prompt_side_are_context() -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Bye?"}]
    ex = parse_example({"prompt": history, "chosen": [{"role": "assistant", "content": "Bye."}], "rejected": "x"},
                       "preference")
    assert roles(ex) == ["user", CONTEXT_ROLE, "user", "assistant"] and ex.response_text == "Bye."
    ex = parse_example({"prompt": history, "completion": [{"role": "assistant", "content": "Bye."}]},
                       "prompt_completion")
    assert ex.response_text == "Bye."


def test_openai_preference_without_messages_names_the_field() -> None:
    with pytest.raises(FieldError) as info:
        parse_example({"input": {}, "preferred_output": [], "non_preferred_output": []}, "preference")
    assert info.value.field == "input.messages"


@pytest.mark.parametrize(("row", "layout", "prompt", "response"), [
    ({"question": "2+2?", "answer": "#### 4"}, "prompt_response", "2+2?", "#### 4"),  # GSM8K
    ({"query": "3*3?", "response": "9", "type": "MATH"}, "prompt_response", "3*3?", "9"),  # MetaMathQA
    ({"problem": "x+1=2", "solution": "x=1", "level": "1"}, "prompt_response", "x+1=2", "x=1"),  # MATH
    ({"input": "Hi", "output": "Hello"}, "prompt_response", "Hi", "Hello"),
    ({"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
     "alpaca", "Summarise.\n\nA long text.", "Short."),  # databricks-dolly-15k
])
def test_common_public_names_are_detected(row: dict, layout: str, prompt: str, response: str) -> None:
    assert detect_layout(row) == layout
    ex = parse_example(row, layout)
    assert (ex.prompt_text, ex.response_text) == (prompt, response)


def test_a_pair_layout_error_names_the_row_field() -> None:
    with pytest.raises(FieldError) as info:
        parse_example({"question": "q", "answer": ""}, "prompt_response")
    assert info.value.field == "answer"
    with pytest.raises(FieldError) as info:
        parse_example({"instruction": "i", "response": 3}, "alpaca")
    assert info.value.field == "response"


# LLaMA-Factory's data/dataset_info.json entries for its demo files (trimmed to the keys slap reads).
DATASET_INFO = {
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "tools": "tools"}},
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "comparison_alpaca": {"file_name": "c.json", "ranking": True,
                          "columns": {"prompt": "instruction", "query": "input", "chosen": "output_good",
                                      "rejected": "output_bad"}},
}


def test_dataset_info_entries_map_like_llama_factory() -> None:
    alpaca = field_map_from_dataset_info(DATASET_INFO, "alpaca_en_demo")
    assert alpaca.describe() == "prompt=instruction,query=input,response=output"
    ex = parse_mapped({"instruction": "Translate.", "input": "cat", "output": "chat"}, alpaca)
    assert (ex.prompt_text, ex.response_text) == ("Translate.\n\ncat", "chat")
    tools = field_map_from_dataset_info(DATASET_INFO, "glaive_toolcall_en_demo")
    row = _rows("sharegpt_tools.jsonl")[0]
    assert parse_mapped(row, tools).response_text == parse_example(dict(row, system=None), "sharegpt").response_text
    dpo = field_map_from_dataset_info(DATASET_INFO, "dpo_en_demo")
    row = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
                             {"from": "human", "value": "Bye?"}],
           "chosen": {"from": "gpt", "value": "Bye."}, "rejected": {"from": "gpt", "value": "No."}}
    ex = parse_mapped(row, dpo)
    assert roles(ex) == ["user", CONTEXT_ROLE, "user", "assistant"] and ex.response_text == "Bye."
    ranked = field_map_from_dataset_info(DATASET_INFO, "comparison_alpaca")
    ex = parse_mapped({"instruction": "2+2?", "input": "", "output_good": "4", "output_bad": "5"}, ranked)
    assert (ex.prompt_text, ex.response_text) == ("2+2?", "4")


def test_dataset_info_errors() -> None:
    with pytest.raises(ValueError, match="no entry 'nope' \\(entries: alpaca_en_demo"):
        field_map_from_dataset_info(DATASET_INFO, "nope")
    with pytest.raises(ValueError, match="columns is not an object"):
        field_map_from_dataset_info({"x": {"columns": "prompt"}}, "x")
