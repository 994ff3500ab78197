"""The embedded demo corpus in data/demo/: well formed, held out, reproducible, correct."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
CHAT_FILES = ["sft_train.jsonl", "sft_val.jsonl", "reason_train.jsonl", "reason_val.jsonl",
              "dpo_train.jsonl", "dpo_val.jsonl", "tasks_val.jsonl", "tool_train.jsonl", "tool_val.jsonl",
              "grpo_val.jsonl"]
ALL_FILES = ["pretrain.jsonl"] + CHAT_FILES


def load_make_chat():
    # data/demo is not a package; load the script by path.
    spec = importlib.util.spec_from_file_location("make_chat", DEMO / "make_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name):
    with open(DEMO / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def user_prompts(records):
    """User-side strings of chat, preference and task records (written here, not
    imported, so the generator's own check is not checking itself)."""
    out = set()
    for r in records:
        if isinstance(r.get("prompt"), str):
            out.add(r["prompt"])
        for key in ("conversations", "messages", "chosen", "rejected"):
            if isinstance(r.get(key), list):
                out |= {m["content"] for m in r[key] if m["role"] == "user"}
    return out


def single_turn_prompts_and_replies(records):
    return [(r["conversations"][-2]["content"], r["conversations"][-1]) for r in records]


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_line_parses(name):
    with open(DEMO / name, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and len(lines) > (10 if name == "tool_val.jsonl" else 100)
    for i, line in enumerate(lines[:-1], 1):
        record = json.loads(line)
        assert isinstance(record, dict) and record, f"{name}:{i}"
        for key in ("conversations", "messages"):
            roles = [m["role"] for m in record.get(key, [])]
            assert not roles or (set(roles) <= {"system", "user", "assistant", "tool"} and "assistant" in roles), \
                f"{name}:{i}"
        if name == "pretrain.jsonl":
            assert list(record) == ["text"] and record["text"].strip() == record["text"] != ""
            assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", record["text"]), f"{name}:{i}"


def test_demo_dir_is_small():
    assert sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file()) < 4_100_000  # 4 MB and grpo_val.jsonl


def test_no_val_prompt_in_train():
    train = set().union(*(user_prompts(read(f)) for f in CHAT_FILES if "_train" in f))
    val = set().union(*(user_prompts(read(f)) for f in CHAT_FILES if "_val" in f))
    assert train and val
    assert not (train & val), sorted(train & val)[:5]


def test_val_files_ask_the_scoring_prompts():
    tasks = read("tasks_val.jsonl")
    prompts = [t["prompt"] for t in tasks]
    assert len(set(prompts)) == len(prompts)
    assert {t["task"] for t in tasks} == {"add", "reverse", "count", "poem", "identity"}
    sft = single_turn_prompts_and_replies(read("sft_val.jsonl"))
    reason = single_turn_prompts_and_replies(read("reason_val.jsonl"))
    assert [p for p, _ in sft] == prompts == [p for p, _ in reason]
    for task, (_, s), (_, r) in zip(tasks, sft, reason):
        assert r["reasoning_content"] and s["content"] == r["content"]
        if task["task"] == "identity":
            assert task["answer"] in s["content"]
        else:
            assert s["content"] == task["answer"]
    dpo_prompts = user_prompts(read("dpo_val.jsonl"))
    assert dpo_prompts == set(prompts)


def test_addition_answers_are_sums():
    adds = [t for t in read("tasks_val.jsonl") if t["task"] == "add"]
    assert adds
    for t in adds:
        a, b = map(int, re.findall(r"\d+", t["prompt"]))
        assert t["answer"] == str(a + b), t


def test_reversal_and_count_answers():
    tasks = read("tasks_val.jsonl") + read("grpo_val.jsonl")
    quoted = r"[“\"]([^”\"]+)[”\"]"
    for t in tasks:
        if t["task"] == "reverse":
            m = re.search(quoted, t["prompt"]) or re.search(r"Write ([a-z]+) in reverse", t["prompt"])
            assert m and t["answer"] == m.group(1)[::-1] != m.group(1), t
        elif t["task"] == "count":
            assert t["answer"] == str(len(re.search(quoted, t["prompt"]).group(1))), t


def test_grpo_val_counts_strings_no_train_file_counts():
    """GRPO's 300 held-out counting prompts: distinct strings, none counted in a train file nor in tasks_val.jsonl."""
    quoted = r"[“\"]([^”\"]+)[”\"]"
    strings = [re.search(quoted, t["prompt"]).group(1) for t in read("grpo_val.jsonl")]
    assert len(strings) == len(set(strings)) == 300
    assert {t["task"] for t in read("grpo_val.jsonl")} == {"count"}
    elsewhere = {m.group(1) for f in CHAT_FILES if "_train" in f or f == "tasks_val.jsonl"
                 for p in user_prompts(read(f)) for m in [re.search(quoted, p)] if m}
    assert elsewhere and not set(strings) & elsewhere


def test_poem_answers_follow_their_line_in_the_corpus():
    corpus = "\n".join(r["text"] for r in read("pretrain.jsonl"))
    poems = [t for t in read("tasks_val.jsonl") if t["task"] == "poem"]
    assert poems
    for t in poems:
        runs = re.findall(r"[\u4e00-\u9fff]+", t["prompt"])  # the line, and template words
        assert any(f"{run}，{t['answer']}" in corpus for run in runs), t


def test_tool_conversations_call_the_calculator_right():
    """Every addition calls the calculator with its two numbers, gets their sum and answers with it; any other task is
    answered without a call; the schema is the one sample.py --tools=calculator offers."""
    pytest.importorskip("transformers")
    from llm_trainer.inference.tools import Tools

    schema = Tools("calculator").schemas
    for name in ("tool_train.jsonl", "tool_val.jsonl"):
        records = read(name)
        assert all(r["tools"] == schema for r in records), name
        for r in records:
            calls = [m for m in r["messages"] if m.get("tool_calls")]
            results = [m for m in r["messages"] if m["role"] == "tool"]
            for call, result in zip(calls, results):
                (c,) = call["tool_calls"]
                a, b = map(int, re.fullmatch(r"(\d+) \+ (\d+)", json.loads(c["function"]["arguments"])["expression"]).groups())
                assert result["tool_call_id"] == c["id"] and result["content"] == str(a + b)
            assert len(calls) == len(results) and r["messages"][-1]["role"] == "assistant"
            if results:
                assert r["messages"][-1]["content"] == results[-1]["content"]
    adds = sum(any(m.get("tool_calls") for m in r["messages"]) for r in read("tool_train.jsonl"))
    assert adds == 200 and len(read("tool_train.jsonl")) == 240 and len(read("tool_val.jsonl")) == 16


def test_reasoning_train_has_reasoning():
    for r in read("reason_train.jsonl"):
        reply = r["conversations"][-1]
        assert reply["role"] == "assistant" and reply["reasoning_content"] and reply["content"]


def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    make_chat = load_make_chat()
    counts = make_chat.generate(tmp_path / "a", seed=make_chat.DEFAULT_SEED)
    make_chat.generate(tmp_path / "b", seed=make_chat.DEFAULT_SEED)
    assert sorted(counts) == sorted(CHAT_FILES)
    for name in CHAT_FILES:
        fresh = (tmp_path / "a" / name).read_bytes()
        assert fresh == (tmp_path / "b" / name).read_bytes(), name
        assert fresh == (DEMO / name).read_bytes(), f"{name} is stale: rerun data/demo/make_chat.py"


def test_generator_refuses_a_leaked_prompt():
    make_chat = load_make_chat()
    train = {"dpo_train.jsonl": [{"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "4"}]}
    val = {"tasks_val.jsonl": [{"task": "add", "prompt": "What is 1 + 2?", "answer": "3"}]}
    with pytest.raises(AssertionError):
        make_chat.check_held_out(train, val)


def test_generator_names_are_parameters(tmp_path):
    make_chat = load_make_chat()
    make_chat.generate(tmp_path, seed=7, bot_name="Pico", author="Ada Lab")
    tasks = [json.loads(line) for line in open(tmp_path / "tasks_val.jsonl", encoding="utf-8")]
    identity = [t for t in tasks if t["task"] == "identity"]
    assert identity and all(t["answer"] == "Pico" for t in identity)
    sft = (tmp_path / "sft_train.jsonl").read_text(encoding="utf-8")
    assert "Ada Lab" in sft and "MiniLlama" not in sft
