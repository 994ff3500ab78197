"""llm_trainer/data/records.py: every input format detected and normalised, every bad record with its reason."""

import json

import pytest

from llm_trainer.data.records import BadRecord, detect_record

U, A, S = "user", "assistant", "system"


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


# -- input formats ------------------------------------------------------------------------------

PAIR = ([msg(U, "2+2?"), msg(A, "4")], [msg(U, "2+2?"), msg(A, "5")])


@pytest.mark.parametrize("record, kind, payload", [
    ({"text": "hello"}, "text", "hello"),
    ({"content": "内容"}, "text", "内容"),
    ({"completion": " spaced "}, "text", " spaced "),
    ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "chat", [msg(U, "hi"), msg(A, "yo")]),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "yo"}]},
     "chat", [msg(S, "be brief"), msg(U, "hi"), msg(A, "yo")]),
    ({"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "你好"},
                        {"from": "gpt", "value": "您好"}, {"from": "user", "value": "再见"},
                        {"from": "assistant", "value": "拜拜"}]},
     "chat", [msg(S, "sys"), msg(U, "你好"), msg(A, "您好"), msg(U, "再见"), msg(A, "拜拜")]),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chat", [msg(U, "q"), msg(A, "a")]),
    ({"instruction": "Translate", "input": "猫", "output": "cat"}, "chat", [msg(U, "Translate\n猫"), msg(A, "cat")]),
    ({"instruction": "Say hi", "input": "", "output": "hi", "system": "polite",
      "history": [["first", "one"], ["second", "two"]]},
     "chat", [msg(S, "polite"), msg(U, "first"), msg(A, "one"), msg(U, "second"), msg(A, "two"),
              msg(U, "Say hi"), msg(A, "hi")]),
    ({"conversations": [{"role": "user", "content": "1+1?"},
                        {"role": "assistant", "content": "2", "reasoning_content": "one and one"}]},
     "chat", [msg(U, "1+1?"), msg(A, "2", reasoning_content="one and one")]),
    ({"conversations": [{"role": "user", "content": "1+1?"},
                        {"role": "assistant", "content": "2", "reasoning_content": ""}]},
     "chat", [msg(U, "1+1?"), msg(A, "2")]),
    ({"prompt": "Translate to French: cat", "completion": "chat"}, "chat",
     [msg(U, "Translate to French: cat"), msg(A, "chat")]),
    ({"prompt": [msg(S, "be brief"), msg(U, "hi")], "completion": [msg(A, "yo")]}, "chat",
     [msg(S, "be brief"), msg(U, "hi"), msg(A, "yo")]),
    ({"chosen": PAIR[0], "rejected": PAIR[1]}, "pair", PAIR),
    ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "pair", PAIR),
    ({"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
      "rejected": {"from": "gpt", "value": "5"}}, "pair", PAIR),
])
def test_formats_normalise(record, kind, payload):
    assert detect_record(record)[:2] == (kind, payload)


@pytest.mark.parametrize("record, reason", [
    ({"foo": 1}, "unknown_shape"),
    ("just a string", "unknown_shape"),
    ({"text": ""}, "empty_content"),
    ({"text": "  \n"}, "empty_content"),
    ({"text": 42}, "non_string_content"),
    (json.loads('{"text": "half a pair \\ud83d here"}'), "lone_surrogate"),
    ({"conversations": []}, "empty_conversation"),
    ([], "empty_conversation"),
    ({"conversations": [{"role": "user", "content": "anyone?"}]}, "no_assistant"),
    ({"conversations": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"conversations": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "y"}]},
     "non_string_content"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "empty_content"),
    ({"conversations": [{"speaker": "user", "text": "x"}]}, "bad_message"),
    ({"instruction": "x", "output": None}, "non_string_content"),
    ({"chosen": "yes", "rejected": "no"}, "unknown_shape"),
    ({"chosen": [msg(U, "a"), msg(A, "b")], "rejected": [msg(U, "other"), msg(A, "c")]}, "pair_prompt_mismatch"),
    ({"chosen": [msg(U, "a")], "rejected": [msg(U, "a")]}, "no_assistant"),
    ({"prompt": "q", "completion": ""}, "empty_content"),
    ({"prompt": [msg(U, "q")], "completion": [msg(U, "not a reply")]}, "no_assistant"),
])
def test_bad_records_have_reasons(record, reason):
    with pytest.raises(BadRecord) as e:
        detect_record(record)
    assert e.value.reason == reason
