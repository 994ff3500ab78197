"""Tool calls as the assistant's actions, on a tiny model that learnt three replies by heart: two calls at once
(serve.py's parallel_tool_calls), a call it only thinks of in its <think> block before the one it makes (never run:
not by sample.py, serve.py or a GRPO rollout, which read a reply with one function, generation.split_reply), and
its reasoning before an answer (shown apart from the answer by sample.py --think=show)."""

import json

import pytest

import prepare
import sample
from llm_trainer.inference import generation
from llm_trainer.inference.tools import Tools
from llm_trainer.training import grpo
from tests.helpers import Server, chat_run_dir

pytest.importorskip("transformers")  # tool schemas come from transformers.utils.get_json_schema


def call(expression):
    return {"name": "calculator", "arguments": {"expression": expression}}


TWO = [{"role": "user", "content": "2 + 3 and 4 * 5?"}]
THINK = [{"role": "user", "content": "6 * 7?"}]
THOUGHT = f"<tool_call>\n{json.dumps(call('1 + 1'))}\n</tool_call>"  # a call it thinks of, in its reasoning
MADE = {**generation.tool_call_message("", [call("6 * 7")]), "reasoning_content": f"maybe {THOUGHT}"}
RESULT = {"role": "tool", "content": "42"}
AFTER = THINK + [generation.tool_call_message("", [call("6 * 7")]), RESULT]  # the history sample.py keeps
ANSWER = {"role": "assistant", "content": "42", "reasoning_content": "the tool said 42"}
REPLIES = [(TWO, generation.tool_call_message("", [call("2 + 3"), call("4 * 5")])), (THINK, MADE), (AFTER, ANSWER),
           (THINK + [MADE, RESULT], ANSWER)]  # a GRPO completion goes on after its reasoning, which it keeps
SCHEMAS = Tools("calculator").schemas


@pytest.fixture(scope="module")
def run(data_tok, tmp_path_factory):
    """A run directory whose model replies REPLIES' replies, greedy (the last reply of each is its only target)."""
    rows = [data_tok.render_chat(messages + [reply], last_reply_only=True, tools=SCHEMAS) for messages, reply in REPLIES]
    return chat_run_dir(tmp_path_factory.mktemp("tool_replies") / "run", data_tok, rows, steps=250, batch=4)


@pytest.fixture(scope="module")
def local(run):
    return generation.load(run)


def local_reply(local, messages):
    """The greedy reply with the calculator offered, from the shared generation code: its ReplyStream, read."""
    model, tok, info = local
    stream = generation.ReplyStream(model, tok, generation.chat_prompt_ids(tok, messages, SCHEMAS),
                                    generation.chat_stop_ids(tok), 256, max_len=info["block_size"], tools=True,
                                    temperature=0.0)
    pieces = list(stream)
    stream.reasoning, stream.content = "".join(p.reasoning for p in pieces), "".join(p.content for p in pieces)
    return stream


@pytest.mark.slow
def test_the_model_learnt_its_replies(local):
    """What the tests below rest on: greedy, the model writes each reply as it was taught."""
    _, tok, _ = local
    for messages, reply in REPLIES:
        prompt = generation.chat_prompt_ids(tok, messages, SCHEMAS)
        taught = tok.render_chat(messages + [reply], tools=SCHEMAS)[0]
        assert taught[: len(prompt)] == prompt
        model = local[0]
        generated = list(model.generate(prompt, 256, temperature=0, stop_ids=generation.chat_stop_ids(tok)))
        assert prompt + generated == taught[:-1]  # all but the newline after <|im_end|>


@pytest.fixture(scope="module")
def server(run):
    s = Server(run)
    yield s
    s.close()


def streamed(client, **request):
    """A streamed reply reassembled: reasoning, content, the calls (name, arguments) by index, finish_reason."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for part in delta.tool_calls or []:
            calls.setdefault(part.index, {"name": part.function.name, "arguments": ""})
            calls[part.index]["arguments"] += part.function.arguments or ""
    return reasoning, content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


def api_calls(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


@pytest.mark.slow
def test_parallel_tool_calls_false_ends_the_reply_at_its_first_call(local, server):
    """The model makes two calls at once: both come back by default and with parallel_tool_calls true, only the first
    with false (and the reply is not generated past it), streamed or not."""
    both = [(c["name"], c["arguments"]) for c in local_reply(local, TWO).calls]
    assert both == [("calculator", {"expression": "2 + 3"}), ("calculator", {"expression": "4 * 5"})]
    client, tokens = server.client(), {}
    for parallel in (None, True, False):
        request = dict(model="run", messages=TWO, tools=SCHEMAS, temperature=0, max_tokens=256,
                       **({} if parallel is None else {"parallel_tool_calls": parallel}))
        r = client.chat.completions.create(**request)
        want = both[:1] if parallel is False else both
        assert api_calls(r.choices[0].message) == want and r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content is None
        assert streamed(client, **request) == ("", "", want, "tool_calls")
        tokens[parallel] = r.usage.completion_tokens
    assert tokens[False] < tokens[True] == tokens[None]


@pytest.mark.slow
def test_a_call_inside_the_reasoning_is_not_made_by_the_server(local, server):
    """The call in the <think> block is reasoning (reasoning_content, as written); the one after it is the call."""
    expected = local_reply(local, THINK)
    assert expected.reasoning == f"maybe {THOUGHT}" and [c["arguments"] for c in expected.calls] == [
        {"expression": "6 * 7"}]
    client = server.client()
    request = dict(model="run", messages=THINK, tools=SCHEMAS, temperature=0, max_tokens=256)
    r = client.chat.completions.create(**request)
    message = r.choices[0].message
    assert message.reasoning_content == f"maybe {THOUGHT}" and message.content is None
    assert api_calls(message) == [("calculator", {"expression": "6 * 7"})] and r.choices[0].finish_reason == "tool_calls"
    assert streamed(client, **request) == (f"maybe {THOUGHT}", "", api_calls(message), "tool_calls")


@pytest.mark.slow
def test_sample_runs_the_call_after_the_reasoning_and_shows_the_reasoning_apart(run, capsys):
    """--think=show prints each reply's <think> block as written, tags and all, apart from what follows it; the call
    the model thinks of is not run (1 + 1), the one it makes is (6 * 7), and its answer follows the result."""
    args = [f"--out_dir={run}", "--tools=calculator", "--temperature=0", f"--prompt={THINK[0]['content']}"]
    ran = '\n[calculator({"expression": "6 * 7"}) -> 42]\n'
    assert sample.main(args + ["--think=show"]) == 0
    assert capsys.readouterr().out == (f"<think>\nmaybe {THOUGHT}\n</think>\n" + ran
                                       + "<think>\nthe tool said 42\n</think>\n42\n")
    assert sample.main(args + ["--think=hide"]) == 0
    assert capsys.readouterr().out == ran + "42\n"


@pytest.mark.slow
def test_a_grpo_rollout_runs_the_call_after_the_reasoning_only(run, tmp_path):
    """Greedy, every completion: its first round stops at the </tool_call> in its reasoning, which is text (nothing
    appended, no call counted), the next at the call it makes, whose result is appended (no target); then the
    answer, which the reward sees."""
    import train

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": THINK[0]["content"], "answer": "42", "tools": SCHEMAS}) + "\n")
    data = str(tmp_path / "data")
    prepare.main([f"--input={tasks}", f"--out_dir={data}", f"--tokenizer={run}", "--stage=grpo", "--val_fraction=0",
                  "--workers=1"])
    r = train.build(train.configure([f"--data_dir={data}", f"--out_dir={tmp_path / 'grpo'}", "--stage=grpo",
                                     f"--init_from={run}", "--batch_size=1", "--grpo_group=2", "--block_size=1024",
                                     "--max_new_tokens=256", "--grpo_tools=calculator", "--grpo_tool_calls=2",
                                     "--reward=exact_answer", "--eval_iters=0", "--device=cpu"]))
    tok = r.tokenizer
    batch, sums = grpo.rollout(r, r.train_batches, 0, 2, greedy=True)
    assert sums["tool_calls"] == 2 and sums["correct"] == 2 and sums["reward"] == 2
    prompt = generation.chat_prompt_ids(tok, THINK, SCHEMAS)
    first = tok.render_chat(THINK + [MADE], tools=SCHEMAS)[0][len(prompt):-2]  # up to its </tool_call>
    results = tok.tool_results_ids(["42"])
    after = generation.chat_prompt_ids(tok, AFTER, SCHEMAS)
    answer = tok.render_chat(AFTER + [ANSWER], tools=SCHEMAS)[0][len(after):-1]  # and its <|im_end|>
    for row in range(2):
        ids = batch.x[row].tolist() + batch.y[row, -1:].tolist()
        assert ids[: len(prompt)] == prompt and ids[len(prompt):] == first + results + answer
        w = batch.w[row].tolist()  # w[i] is the weight of label ids[i + 1]
        assert w[len(prompt) - 1:] == [1] * len(first) + [0] * len(results) + [1] * len(answer)
