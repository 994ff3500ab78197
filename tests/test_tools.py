"""Tool calls: the template (Qwen2.5 / Hermes layout), its tags as single tokens, the loss mask on what the assistant
wrote, transformers' apply_chat_template(tools=...) giving the same ids, and the parser of calls in a reply."""

import json

import pytest

from llm_trainer.data import tokenizer
from llm_trainer.data.tokenizer import TOOL_TAGS, with_tools
from llm_trainer.inference.generation import parse_call, split_tool_calls
from tests.helpers import train_sentencepiece

U, A, S, T = "user", "assistant", "system", "tool"

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 2 + 3"}},
                   "required": ["expression"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "天气 <|im_end|> of a city",  # a special string in a schema stays text
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [CALC, WEATHER]


def call(name, arguments, call_id=None):
    return {**({"id": call_id} if call_id else {}), "type": "function", "function": {"name": name, "arguments": arguments}}


# (messages, tools): OpenAI's shapes, the arguments a JSON string or an object
TOOL_CHATS = [
    ([{"role": U, "content": "What is 147 + 85?"},
      {"role": A, "content": None, "tool_calls": [call("calculator", '{"expression": "147 + 85"}', "call_1")]},
      {"role": T, "tool_call_id": "call_1", "content": "232"},
      {"role": A, "content": "232"}], TOOLS),
    # a system message, parallel calls beside text, object arguments, two results in one turn, then a question
    ([{"role": S, "content": "Be brief."}, {"role": U, "content": "北京和上海的天气？"},
      {"role": A, "content": "Let me look.", "tool_calls": [call("get_weather", {"city": "北京"}),
                                                           call("get_weather", {"city": "上海"})]},
      {"role": T, "content": '{"temp": 28}'}, {"role": T, "name": "get_weather", "content": '{"temp": 15}'},
      {"role": A, "content": "北京28度，上海15度。"}, {"role": U, "content": "Thanks"}], TOOLS),
    # reasoning before a call; a result that holds the tags and <|im_end|> as text; an empty content ""
    ([{"role": U, "content": "2*21?"},
      {"role": A, "content": "", "reasoning_content": "use the tool", "tool_calls": [call("calculator", {"expression": "2*21"})]},
      {"role": T, "content": "</tool_response><|im_end|> 42 <tool_call>"},
      {"role": A, "content": "42 <tool_call>inline</tool_call>"}], TOOLS),
    # arguments with a special string, MiniMind's call shape ({"name", "arguments"} without "function")
    ([{"role": U, "content": "echo"},
      {"role": A, "content": "", "tool_calls": [{"name": "calculator", "arguments": {"expression": "<|im_end|>"}}]},
      {"role": T, "content": "error"}], TOOLS),
]


def test_the_tags_are_single_tokens(data_tok):
    """Trained: ids 7..10, after the chat tokens; matched whole, but not "special" (as in Qwen2.5)."""
    assert list(data_tok.tool_tag_ids) == TOOL_TAGS and list(data_tok.tool_tag_ids.values()) == [7, 8, 9, 10]
    added = {a["content"]: a for a in json.loads(data_tok.to_str())["added_tokens"]}
    assert all(not added[t]["special"] and not added[t]["normalized"] for t in TOOL_TAGS)
    assert data_tok.decode([7, 8], skip_special_tokens=True) == "<tool_call></tool_call>"
    assert data_tok.encode("<tool_call>") != [7]  # plain text: the tag's characters


def test_layout_is_qwen25s(data_tok):
    """The text of a tool conversation, written out: Qwen2.5's layout, which llama.cpp, vLLM and ollama parse."""
    messages, tools = TOOL_CHATS[0]
    ids, _ = data_tok.render_chat(messages, tools=[CALC])
    schema = json.dumps(CALC, ensure_ascii=False)
    assert data_tok.decode(ids) == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{schema}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call>"
        ' XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWhat is 147 + 85?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "147 + 85"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n232\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n232<|im_end|>\n")
    tags = {i for i in ids if i in data_tok.tool_tag_ids.values()}
    assert tags == set(data_tok.tool_tag_ids.values())  # every tag a token, the system turn's too


def test_mask_is_what_the_assistant_wrote(data_tok):
    messages, tools = TOOL_CHATS[1]
    ids, mask = data_tok.render_chat(messages, tools=tools)
    targets = data_tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets == ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>'
                       "北京28度，上海15度。<|im_end|>")
    # the schemas, the results and the headers are never targets
    outside = data_tok.decode([i for i, m in zip(ids, mask) if not m])
    assert '"temp": 28' in outside and "get_weather" in outside and "# Tools" in outside
    # DPO keeps the final reply only
    _, last = data_tok.render_chat(messages, last_reply_only=True, tools=tools)
    assert data_tok.decode([i for i, m in zip(ids, last) if m]) == "北京28度，上海15度。<|im_end|>"


def test_special_strings_stay_text_outside_replies(data_tok):
    """A result, a schema or an argument that holds the tags or <|im_end|>: text; a reply's own tags: tokens."""
    messages, tools = TOOL_CHATS[2]
    ids, mask = data_tok.render_chat(messages, tools=tools)
    n = {t: ids.count(i) for t, i in data_tok.tool_tag_ids.items()}
    # the system turn's 2+1 pairs of call tags, the call, the reply's inline pair; one response block
    assert n == {"<tool_call>": 2 + 1 + 1, "</tool_call>": 2 + 1 + 1, "<tool_response>": 1, "</tool_response>": 1}
    assert ids.count(data_tok.im_end_id) == 5  # the five turns' own; the result's is text
    reply = data_tok.decode([i for i, m in zip(ids, mask) if m])
    assert reply.endswith("42 <tool_call>inline</tool_call><|im_end|>") and "<think>\nuse the tool\n</think>\n<tool_call>" in reply
    messages, tools = TOOL_CHATS[3]
    ids, _ = data_tok.render_chat(messages, tools=tools)
    assert ids.count(data_tok.im_end_id) == 4 and data_tok.conversation_holds_special_strings(with_tools(messages, tools))
    assert not data_tok.conversation_holds_special_strings(with_tools(TOOL_CHATS[0][0], [CALC]))


def test_without_tools_nothing_changes(data_tok):
    """No tools (none given, or an empty list): the conversation renders as it always did."""
    messages = [{"role": S, "content": "sys"}, {"role": U, "content": "hi"}, {"role": A, "content": "yo"}]
    assert data_tok.render_chat(messages, tools=[]) == data_tok.render_chat(messages)
    assert data_tok.decode(data_tok.render_chat(messages)[0]) == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")


def test_tools_given_or_carried_by_the_system_message_render_alike(data_tok):
    for messages, tools in TOOL_CHATS:
        assert data_tok.render_chat(with_tools(messages, tools)) == data_tok.render_chat(messages, tools=tools)


@pytest.mark.parametrize("chat", range(len(TOOL_CHATS)))
def test_hf_apply_chat_template_gives_the_same_ids(data_tok, data_tok_dir, chat):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(data_tok_dir))
    messages, tools = TOOL_CHATS[chat]
    for gen in (False, True):
        ours = data_tok.render_chat(messages, add_generation_prompt=gen, tools=tools)[0]
        ref = hf.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert list(ref) == ours
        carried = hf.apply_chat_template(with_tools(messages, tools), tokenize=True, add_generation_prompt=gen,
                                         return_dict=False)
        assert list(carried) == ours
    # a reply's call decoded by transformers keeps its tags (they are not "special")
    text = hf.decode(data_tok.render_chat(messages, tools=tools)[0], skip_special_tokens=True)
    assert "<tool_call>" in text


def test_tool_results_ids_continue_a_cut_reply(data_tok):
    """What a GRPO rollout appends after a call equals the rendering of the conversation it stands for."""
    messages = TOOL_CHATS[1][0][:5]
    prompt = data_tok.render_chat(messages[:2], add_generation_prompt=True, tools=TOOLS)[0]
    whole = data_tok.render_chat(messages, add_generation_prompt=True, tools=TOOLS)[0]
    reply = data_tok.render_chat(messages[:3], tools=TOOLS)[0][len(prompt):]
    assert reply[-2:] == [data_tok.im_end_id, data_tok.encode("\n")[0]]
    cut = reply[:-2]  # up to </tool_call>
    assert prompt + cut + data_tok.tool_results_ids(['{"temp": 28}', '{"temp": 15}']) == whole


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_tokenizer_gets_the_tags(tmp_path, model_type, data_corpus):
    train_sentencepiece(tmp_path, model_type, data_corpus)
    tok = tokenizer.load_tokenizer(tmp_path / "sp.model")
    messages, tools = TOOL_CHATS[0]
    ids, mask = tok.render_chat(messages, tools=tools)
    assert [ids.count(i) for i in tok.tool_tag_ids.values()] == [3, 3, 1, 1]  # the system turn's 2, the call's 1
    reply = tok.decode([i for i, m in zip(ids, mask) if m])
    assert reply.count("<tool_call>") == 1 and "calculator" in reply and "232" in reply and "Tools" not in reply


# -- the parser ---------------------------------------------------------------------------------------------------

def test_parse_call():
    assert parse_call(' {"name": "f", "arguments": {"x": 1}} ') == {"name": "f", "arguments": {"x": 1}}
    assert parse_call('{"name": "f", "arguments": "{\\"x\\": 1}"}') == {"name": "f", "arguments": {"x": 1}}
    assert parse_call('{"name": "f"}') == {"name": "f", "arguments": {}}
    for bad in ('{"name": "f", "arguments": {"x": 1}', "not json", '{"arguments": {}}', '{"name": ""}', "[1]",
                '{"name": "f", "arguments": [1]}', '{"name": 3}', '{"name": "f", "arguments": "{bad"}'):
        assert parse_call(bad) is None


REPLY = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call>')


@pytest.mark.parametrize("text, content, names", [
    (REPLY, "Let me look.", ["get_weather", "get_weather"]),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', "", ["f"]),
    ("no call here", "no call here", []),
    # not a call: kept as the text it is, never an error
    ('<tool_call>\n{"name": "f", "arguments": {"x": </tool_call>', '<tool_call>\n{"name": "f", "arguments": {"x": </tool_call>', []),
    ('a\n<tool_call>{"name": "f"', 'a\n<tool_call>{"name": "f"', []),  # unclosed
    ('a\n<tool_call>oops</tool_call>\n<tool_call>{"name": "g"}</tool_call> b', "a\n<tool_call>oops</tool_call> b", ["g"]),
])
def test_split_tool_calls(text, content, names):
    got, calls = split_tool_calls(text)
    assert got == content and [c["name"] for c in calls] == names


@pytest.mark.parametrize("text", [REPLY, 'a\n<tool_call>oops</tool_call>\nb<tool_call>{"name": "g"}</tool_call>\n',
                                  "x <tool", 'a\n\n<tool_call>{"name": "f"}'])
def test_streaming_never_takes_back(text):
    """Every prefix shows a prefix of the final text, and the calls found so far are the final ones' first."""
    final, final_calls = split_tool_calls(text)
    for n in range(len(text) + 1):
        shown, calls = split_tool_calls(text[:n], final=False)
        assert final.startswith(shown) and final_calls[: len(calls)] == calls


# -- data: every input shape becomes OpenAI's, its ids those of apply_chat_template(messages, tools=...) ----------

SCHEMA = CALC["function"]
OPENAI_CHAT = {"tools": [CALC], "messages": [
    {"role": U, "content": "What is 147 + 85?"},
    {"role": A, "content": None, "tool_calls": [call("calculator", '{"expression":"147 + 85"}', "call_9")]},
    {"role": T, "tool_call_id": "call_9", "content": "232"}, {"role": A, "content": "It is 232."}]}
# the same conversation in the other shapes, each with what it reads as in OpenAI's (tools, messages)
SHAREGPT_CHAT = {"tools": json.dumps([SCHEMA]), "conversations": [
    {"from": "human", "value": "What is 147 + 85?"},
    {"from": "function_call", "value": json.dumps({"name": "calculator", "arguments": {"expression": "147 + 85"}})},
    {"from": "observation", "value": "232"}, {"from": "gpt", "value": "It is 232."}]}
MINIMIND_CHAT = {"conversations": [
    {"role": S, "content": "You can count.", "tools": json.dumps([CALC])},
    {"role": U, "content": "What is 147 + 85?"},
    {"role": A, "content": "", "tool_calls": json.dumps([{"name": "calculator", "arguments": {"expression": "147 + 85"}}])},
    {"role": T, "content": "232"}, {"role": A, "content": "It is 232."}]}
PARALLEL_CHAT = {"tools": TOOLS, "messages": [  # parallel calls beside text, results answering them by id, out of order
    {"role": U, "content": "北京和上海？"},
    {"role": A, "content": "Both.", "tool_calls": [call("get_weather", {"city": "北京"}, "a"), call("get_weather", '{"city": "上海"}', "b")]},
    {"role": T, "tool_call_id": "b", "content": "15"}, {"role": T, "tool_call_id": "a", "content": "28"},
    {"role": A, "content": "28, 15"}]}
LEGACY_CHAT = {"messages": [  # OpenAI's older function_call / role "function"
    {"role": U, "content": "2+2?"},
    {"role": A, "content": None, "function_call": {"name": "calculator", "arguments": '{"expression": "2+2"}'}},
    {"role": "function", "name": "calculator", "content": "4"}, {"role": A, "content": "4"}]}

# what each reads as, in OpenAI's (messages, tools), and the text of its targets
USER, ANSWER = {"role": U, "content": "What is 147 + 85?"}, {"role": A, "content": "It is 232."}
CALL_147 = {"role": A, "content": "", "tool_calls": [call("calculator", {"expression": "147 + 85"})]}
CALL_TARGETS = ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "147 + 85"}}\n</tool_call><|im_end|>'
                "It is 232.<|im_end|>")
TOOL_RECORDS = [
    (OPENAI_CHAT, (OPENAI_CHAT["messages"], [CALC]),
     CALL_TARGETS.replace('{"expression": "147 + 85"}', '{"expression":"147 + 85"}')),  # JSON text verbatim
    (SHAREGPT_CHAT, ([USER, CALL_147, {"role": T, "content": "232"}, ANSWER], [CALC]), CALL_TARGETS),
    (MINIMIND_CHAT, ([{"role": S, "content": "You can count."}, USER, CALL_147, {"role": T, "content": "232"}, ANSWER],
                     [CALC]), CALL_TARGETS),
    (PARALLEL_CHAT, (PARALLEL_CHAT["messages"], TOOLS),
     'Both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>28, 15<|im_end|>'),
    (LEGACY_CHAT, ([LEGACY_CHAT["messages"][0], {"role": A, "content": None, "tool_calls": [
        call("calculator", '{"expression": "2+2"}')]}, {"role": T, "content": "4"}, LEGACY_CHAT["messages"][3]], None),
     '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call><|im_end|>4<|im_end|>'),
]


def test_prepared_ids_are_apply_chat_template_ids_and_targets_the_replies(tmp_path, data_tok_dir):
    """Each shape prepared: the ids transformers' apply_chat_template(messages, tools=...) gives for the OpenAI form
    of the record, targets exactly the assistant's text and calls."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers import documents, run_prepare, write_jsonl

    hf = transformers.AutoTokenizer.from_pretrained(str(data_tok_dir))
    path = write_jsonl(tmp_path / "tools.jsonl", [r for r, _, _ in TOOL_RECORDS])
    meta = run_prepare(tmp_path / "out", input=path, tokenizer=data_tok_dir, val_fraction=0.0)
    assert meta["counts"]["kept"] == len(TOOL_RECORDS) and not meta["counts"]["skipped"]
    assert meta["counts"]["by_format"] == {"messages_tools": 3, "sharegpt_tools": 1, "conversations_tools": 1}
    tok = tokenizer.load_tokenizer(tmp_path / "out")
    for (_, (messages, tools), targets), (ids, mask) in zip(TOOL_RECORDS, documents(tmp_path / "out")):
        assert ids == list(hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False))
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == targets


BAD_TOOL_LINES = [
    OPENAI_CHAT,
    {"tools": [CALC], "messages": [  # arguments that are not JSON
        {"role": U, "content": "q"}, {"role": A, "content": None, "tool_calls": [call("calculator", "{expression: 1}")]},
        {"role": T, "content": "1"}, {"role": A, "content": "1"}]},
    {"messages": [{"role": U, "content": "q"}, {"role": T, "content": "a result of nothing"}, {"role": A, "content": "x"}]},
    {"messages": [{"role": U, "content": "q"}, {"role": A, "content": None, "tool_calls": [call("calculator", "{}", "x")]},
                  {"role": T, "tool_call_id": "y", "content": "1"}, {"role": A, "content": "1"}]},  # answers another id
    {"messages": [{"role": U, "content": "q"}, {"role": A, "content": None, "tool_calls": [call("calculator", "{}")]},
                  {"role": T, "content": "1"}, {"role": T, "content": "2"}, {"role": A, "content": "1"}]},  # one too many
    {"messages": [{"role": U, "content": "q"}, {"role": A, "content": None, "tool_calls": [call("", "{}")]}]},
    {"messages": [{"role": U, "content": "q"}, {"role": A, "content": None, "tool_calls": [call("f", "[1, 2]")]}]},
    {"tools": "not json", "messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]},
    {"tools": [{"description": "no name"}], "messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "calculator(1)"}]},
]


def test_bad_tool_records_are_counted_with_file_and_line(tmp_path, data_tok_dir):
    from tests.helpers import run_prepare, write_jsonl

    path = write_jsonl(tmp_path / "bad.jsonl", BAD_TOOL_LINES)
    meta = run_prepare(tmp_path / "out", input=path, tokenizer=data_tok_dir, val_fraction=0.0)
    counts = meta["counts"]
    assert counts["kept"] == 1 and counts["skipped"] == {"bad_tool_arguments": 2, "tool_answers_no_call": 3,
                                                         "bad_tool_call": 2, "bad_tools": 2}
    assert counts["skipped_examples"]["bad_tool_arguments"] == [f"{path}:2", f"{path}:7"]
    assert counts["skipped_examples"]["tool_answers_no_call"] == [f"{path}:3", f"{path}:4", f"{path}:5"]


# -- the exports: transformers' and llama.cpp's renderings of the saved template ---------------------------------

def test_exports_render_tool_conversations_to_the_same_ids(tmp_path):
    """The exported tokenizer's apply_chat_template(messages, tools=...) and the GGUF's template in llama.cpp (through
    llama-cpp-python) give render_chat()'s ids; llama.cpp shows the tags in generated text (not control tokens).
    Content holding special strings is left out here: llama.cpp does not undo the template's escape (README)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    transformers = pytest.importorskip("transformers")
    import export
    from tests.helpers import make_run_dir

    run = make_run_dir(tmp_path / "run", stage="sft", steps=1)
    export.export(run, str(tmp_path / "hf"))
    export.export_gguf(run, str(tmp_path / "m.gguf"), "f32")
    tok = tokenizer.load_tokenizer(run)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        template = llm.metadata["tokenizer.chat_template"]
        chats = [(TOOL_CHATS[0][0], [CALC])] + [form for _, form, _ in TOOL_RECORDS if form[1] != TOOLS]
        for messages, tools in chats:
            for gen in (False, True):
                ours = tok.render_chat(messages, add_generation_prompt=gen, tools=tools)[0]
                assert list(hf.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=gen,
                                                   return_dict=False)) == ours
                rendered = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
                    template=template, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                    add_generation_prompt=gen)(messages=messages, tools=tools)
                assert llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True) == ours
        tags = list(tok.tool_tag_ids.values())
        assert [llm.detokenize([t]) for t in tags] == [t.encode() for t in TOOL_TAGS]
    finally:
        llm.close()
