"""Tools in use: the calculator and tools files, sample.py --tools on a model trained on tool conversations, and GRPO
with tools in its rollouts (the results appended, never targets; resume and 2 ranks == 1 process)."""

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch

import prepare
import sample
from llm_trainer.core.checkpoint import load_checkpoint
from llm_trainer.data import shards
from llm_trainer.data.tokenizer import load_tokenizer
from llm_trainer.inference.generation import chat_prompt_ids, reply_with_tools
from llm_trainer.inference.tools import Tools, calculator
from llm_trainer.training import grpo, losses
from tests.helpers import (TINY, metrics, sigkill_after_checkpoint, train_in_process, train_losses,
                           two_ranks_equal_one_process)

pytest.importorskip("transformers")  # tool schemas come from transformers.utils.get_json_schema

TOOLS_FILE = '''
def lookup(word: str):
    """The code of a word.

    Args:
        word: the word to look up
    """
    return "7777"


def broken(x: int):
    """Always fails.

    Args:
        x: anything
    """
    raise RuntimeError("no luck")
'''


# -----------------------------------------------------------------------------
# the tools themselves


@pytest.mark.parametrize("expression, value", [
    ("147 + 85", "232"), ("2 * (3 + 4)", "14"), ("7 / 2", "3.5"), ("6 / 3", "2"), ("-2 ** 2", "-4"), ("2^10", "1024"),
    ("17 // 5 % 2", "1"), ("3 × 4 ÷ 6", "2"),
])
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "x + 1", "(1).real", "[1, 2]", "9 ** 9 ** 9", "2 ** 5000", "1" * 300, "1 +",
    "'a' * 3", "1e308 * 10", "1e999", "-1e999", "(-8) ** (1 / 3)", "(-1) ** 0.5 * 1e308 * 1e308",
])
def test_calculator_runs_no_code_and_no_giant_numbers(expression):
    result = Tools("calculator").run({"name": "calculator", "arguments": {"expression": expression}})
    assert result.startswith("error: ")


def test_a_tools_file_gives_schemas_and_runs_calls(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_FILE, encoding="utf-8")
    tools = Tools(f"calculator,{path}")
    assert list(tools.functions) == ["calculator", "lookup", "broken"]
    lookup = tools.schemas[1]["function"]
    assert lookup["name"] == "lookup" and lookup["description"] == "The code of a word."
    assert lookup["parameters"]["properties"]["word"] == {"type": "string", "description": "the word to look up"}
    assert tools.run({"name": "lookup", "arguments": {"word": "x"}}) == "7777"
    assert tools.run({"name": "broken", "arguments": {"x": 1}}) == "error: RuntimeError: no luck"
    assert tools.run({"name": "lookup", "arguments": {"nope": 1}}).startswith("error: TypeError")
    assert tools.run({"name": "missing", "arguments": {}}).startswith("error: no tool named 'missing'")


@pytest.mark.parametrize("body, message", [
    ("def f(x):\n    return x\n", "no schema for f"),
    ("x = 1\n", "defines no public function"),
    ("raise ValueError('boom')\n", "raised ValueError: boom"),
])
def test_a_bad_tools_file_is_one_clear_line(tmp_path, capsys, body, message):
    path = tmp_path / "bad.py"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        Tools(str(path))
    assert e.value.code == 2 and message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# generation that runs the calls (a scripted model: each prompt gets the next of its replies)


class Scripted:
    """A model whose n-th reply is replies[n] (token ids); it keeps the prompts it was given."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.prompts = tok, replies, []
        self.mcfg = SimpleNamespace(max_seq_len=4096)

    def generate(self, prompt_ids, max_new_tokens, stop_ids=(), **sampling):
        self.prompts.append(list(prompt_ids))
        yield from self.replies[len(self.prompts) - 1] + [self.tok.im_end_id]


def written_call(tok, inside):
    """The ids of a reply holding one <tool_call> block whose inside is the text `inside`."""
    tags = tok.tool_tag_ids
    return [tags["<tool_call>"], *tok.encode(f"\n{inside}\n"), tags["</tool_call>"]]


CALL_2_3 = json.dumps({"name": "calculator", "arguments": {"expression": "2 + 3"}})


def test_reply_with_tools_runs_the_call_and_feeds_its_result_back(data_tok):
    model, seen = Scripted(data_tok, [written_call(data_tok, CALL_2_3), data_tok.encode("5")]), []
    added = reply_with_tools(model, data_tok, [{"role": "user", "content": "2+3?"}], Tools("calculator"),
                             on_call=lambda call, result: seen.append((call, result)))
    assert added == [{"role": "assistant", "content": "", "tool_calls": [
                         {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}}]},
                     {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}]
    assert seen == [({"name": "calculator", "arguments": {"expression": "2 + 3"}}, "5")]
    # the second prompt is the first, the call as written and its result in a tool turn: the template's ids
    schemas = Tools("calculator").schemas
    assert model.prompts[1] == chat_prompt_ids(data_tok, [{"role": "user", "content": "2+3?"}, *added[:2]], schemas)
    assert "<tool_response>\n5\n</tool_response>" in data_tok.decode(model.prompts[1])


def test_reply_with_tools_stops_after_max_steps_and_leaves_the_last_call_as_text(data_tok):
    model = Scripted(data_tok, [written_call(data_tok, CALL_2_3)] * 3)
    added = reply_with_tools(model, data_tok, [{"role": "user", "content": "2+3?"}], Tools("calculator"), max_steps=2)
    assert len(model.prompts) == 3 and [m["role"] for m in added] == ["assistant", "tool"] * 2 + ["assistant"]
    assert CALL_2_3 in added[-1]["content"] and "tool_calls" not in added[-1]


@pytest.mark.parametrize("inside", ['{"name": "calculator", "arguments": {2 + 3}}', "calculator(2 + 3)",
                                    '{"arguments": {"expression": "2 + 3"}}'])
def test_a_call_that_is_not_valid_json_is_shown_as_text(data_tok, inside):
    model, seen, shown = Scripted(data_tok, [written_call(data_tok, inside)]), [], []
    added = reply_with_tools(model, data_tok, [{"role": "user", "content": "2+3?"}], Tools("calculator"),
                             on_call=lambda *a: seen.append(a), on_text=shown.append)
    assert added == [{"role": "assistant", "content": f"<tool_call>\n{inside}\n</tool_call>"}] and not seen
    assert "".join(shown) == added[0]["content"] and len(model.prompts) == 1


# -----------------------------------------------------------------------------
# a model trained on tool conversations


def question(a, b):
    """The sum asked as the call will write it: quoted, so the prompt's tokens are the call's (a tiny model copies
    them within a few hundred steps; " 12" into "1", "2" it does not learn as fast)."""
    return f'What is "{a} + {b}"?'


def tool_conversations(path, n, seed):
    """n conversations in which the user asks for a sum, the assistant calls the calculator, and answers its result."""
    rng, schema, lines = random.Random(seed), Tools("calculator").schemas, []
    for i in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        lines.append({"tools": schema, "messages": [
            {"role": "user", "content": question(a, b)},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function",
                 "function": {"name": "calculator", "arguments": json.dumps({"expression": f"{a} + {b}"})}}]},
            {"role": "tool", "tool_call_id": "c", "content": str(a + b)},
            {"role": "assistant", "content": str(a + b)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """(data dir, run dir) of a tiny model trained from scratch for 500 steps at 3e-3 on calculator conversations
    (its tokenizer trained on them too). 300 steps at 1e-2 call the tool but answer 46 to a result of 49: copying the
    result into the reply takes these steps. Fewer (250 at 6e-3, 200 at 3e-3) still call the tool, but every GRPO
    rollout then earns reward 0, which leaves the 2-ranks test comparing zeros."""
    root = tmp_path_factory.mktemp("tool_model")
    data = str(root / "data")
    meta = prepare.main([f"--input={tool_conversations(root / 'train.jsonl', 1000, 0)}",
                  f"--val_input={tool_conversations(root / 'val.jsonl', 16, 1)}", f"--out_dir={data}",
                  "--tokenizer=train", "--vocab_size=512", "--max_len=384", "--workers=1"])
    assert meta["counts"]["truncated"] == 0 and meta["counts"]["kept"] == 1016
    run = str(root / "run")
    train_in_process([f"--data_dir={data}", f"--out_dir={run}", "--stage=sft", *TINY, "--block_size=384",
                      "--batch_size=8", "--max_iters=500", "--eval_interval=500", "--learning_rate=3e-3",
                      "--warmup_iters=20"])
    return data, run


@pytest.mark.slow
def test_sample_calls_the_tool_and_answers_with_its_result(tool_model, tmp_path, capsys):
    """Greedy: the model writes a calculator call on an addition, sample.py runs it, shows [call -> result] and the
    model answers with the result; a tools file of the same name runs instead of the built-in, and its results,
    which are not the prompt's sum, are the answers: the reply reads the result, not the prompt. (The tiny model's
    numbers are not the prompt's: copying them takes more steps than a test has; the scripted tests above check that
    the result is what the next prompt holds. The results are sums of two 10..49s, as in training: a number of
    another length it does not copy.)"""
    _, run = tool_model
    shown = re.compile(r'\n\[calculator\(\{"expression": "(\d+) \+ (\d+)"\}\) -> (\d+)\]\n(.+)\n$')
    assert sample.main([f"--out_dir={run}", "--tools=calculator", "--temperature=0", "--max_new_tokens=48",
                        f"--prompt={question(12, 37)}"]) == 0
    a, b, result, answer = shown.search(capsys.readouterr().out).groups()
    assert int(result) == int(a) + int(b) and answer == result
    for value in ("77", "31"):  # the calculator's schema, a wrong result
        fake = tmp_path / value / "calculator.py"
        fake.parent.mkdir()
        fake.write_text('def calculator(expression: str):\n    """Evaluate an arithmetic expression.\n\n    Args:\n'
                        f'        expression: e.g. 147 + 85\n    """\n    return "{value}"\n', encoding="utf-8")
        assert Tools(str(fake)).schemas == Tools("calculator").schemas
        assert sample.main([f"--out_dir={run}", f"--tools={fake}", "--temperature=0", "--max_new_tokens=48",
                            f"--prompt={question(21, 19)}"]) == 0
        assert shown.search(capsys.readouterr().out).group(3, 4) == (value, value)  # 21 + 19 is 40


# -----------------------------------------------------------------------------
# GRPO with tools in the rollout


def scripted_rollout_run(tool_model, tmp_path, monkeypatch):
    """A grpo run on calculator prompts whose model is scripted: every row first writes a call, then "done"."""
    import train

    data, run_dir = tool_model
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1),
                                         "tools": Tools("calculator").schemas}) + "\n" for a in range(20, 28)))
    grpo_data = str(tmp_path / "grpo_data")
    prepare.main([f"--input={tasks}", f"--out_dir={grpo_data}", f"--tokenizer={data}", "--stage=grpo",
                  "--val_fraction=0", "--workers=1"])
    run = train.build(train.configure([f"--data_dir={grpo_data}", f"--out_dir={tmp_path / 'run'}", "--stage=grpo",
                                       f"--init_from={run_dir}", "--batch_size=2", "--grpo_group=2",
                                       "--block_size=384", "--max_new_tokens=64", "--grpo_tools=calculator",
                                       "--eval_iters=0"]))
    tok = run.tokenizer
    call = tok.encode('\n{"name": "calculator", "arguments": {"expression": "20 + 1"}}\n')
    scripted = [[tok.tool_tag_ids["<tool_call>"], *call, tok.tool_tag_ids["</tool_call>"]],
                tok.encode("done") + [tok.im_end_id]]

    def generate_batch(prompts, max_new_tokens, **kwargs):  # after a tool result, the answer; else the call
        return [list(scripted[tok.tool_tag_ids["<tool_response>"] in p]) for p in prompts]

    monkeypatch.setattr(run.raw_model, "generate_batch", generate_batch)
    return run, scripted


@pytest.mark.slow
def test_tool_results_carry_no_loss_and_no_log_probability(tool_model, tmp_path, monkeypatch):
    run, scripted = scripted_rollout_run(tool_model, tmp_path, monkeypatch)
    tok = run.tokenizer
    batch, sums = grpo.rollout(run, run.train_batches, 0, run.cfg["grpo_group"])
    results = tok.tool_results_ids(["21"])
    completion = scripted[0] + results + scripted[1]
    assert sums["tool_calls"] == 4 and sums["completion_tokens"] == 4 * (len(scripted[0]) + len(scripted[1]))
    for row in range(4):
        ids = batch.x[row].tolist() + batch.y[row, -1:].tolist()
        start = next(i for i in range(len(ids)) if ids[i:i + len(completion)] == completion)
        w = batch.w[row].tolist()  # w[i] is the weight of label y[i] = ids[i + 1]
        expected = [1] * len(scripted[0]) + [0] * len(results) + [1] * len(scripted[1])
        assert w[start - 1: start - 1 + len(completion)] == expected and sum(w) == len(scripted[0]) + len(scripted[1])
        assert tok.decode(ids[start + len(scripted[0]): start + len(scripted[0]) + len(results)]) == (
            "<|im_end|>\n<|im_start|>user\n<tool_response>\n21\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # the reward saw the final answer ("done"), not the call: every reward 0, and an exact "21" would have been 1
    assert sums["reward"] == 0 and sums["correct"] == 0
    # no log-probability of a tool-result token enters the update: other labels there change neither loss nor grads
    batch.advantages = torch.tensor([1.0, 0.5, 0.25, 2.0])
    cfg = run.cfg

    def loss_and_grads(b):
        run.model.zero_grad()
        loss, _ = losses.grpo_loss(run.model, b, cfg["temperature"], cfg["grpo_clip"], cfg["grpo_kl"])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in run.model.parameters()]

    loss, grads = loss_and_grads(batch)
    batch.y = torch.where(batch.w == 0, (batch.y + 1) % tok.vocab_size, batch.y)
    loss2, grads2 = loss_and_grads(batch)
    assert loss == loss2 and all(torch.equal(a, b) for a, b in zip(grads, grads2)) and loss != 0


def grpo_tool_args(data, out, init, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--stage=grpo", f"--init_from={init}", "--grpo_tools=calculator",
            "--reward=exact_answer", "--block_size=384", "--batch_size=2", "--grpo_group=4", "--max_new_tokens=48",
            "--optimizer=adamw", "--learning_rate=1e-3", "--warmup_iters=0", "--eval_iters=1", "--log_interval=1", "--device=cpu", *extra]


@pytest.fixture(scope="module")
def grpo_tasks(tool_model, tmp_path_factory):
    data, _ = tool_model
    root = tmp_path_factory.mktemp("grpo_tasks")
    rng, schema = random.Random(2), Tools("calculator").schemas
    for name, n in (("train", 24), ("val", 4)):
        (root / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": question(a, b), "answer": str(a + b), "tools": schema}) + "\n"
            for a, b in ((rng.randint(10, 49), rng.randint(10, 49)) for _ in range(n))))
    out = str(root / "data")
    prepare.main([f"--input={root / 'train.jsonl'}", f"--val_input={root / 'val.jsonl'}", f"--out_dir={out}",
                  f"--tokenizer={data}", "--stage=grpo", "--workers=1"])
    return out


@pytest.mark.slow
def test_grpo_with_tools_calls_them_and_two_ranks_equal_one(tool_model, grpo_tasks, tmp_path):
    _, init = tool_model
    args = [a for a in grpo_tool_args(grpo_tasks, "", init, "--max_iters=2", "--eval_interval=2",
                                      "--gradient_accumulation_steps=2") if a != "--out_dir="]
    runs, one = two_ranks_equal_one_process(args, tmp_path, keys=("loss", "reward"), fsdp=False)
    assert "tools calculator, 2 call(s) per completion at most" in one.stdout
    steps = [r for r in metrics(runs["one"]) if "reward" in r]
    assert all(r["tool_calls"] > 0.5 for r in steps)  # most completions call the calculator
    assert all(r["reward"] > 0 for r in steps)  # some answer right: the ranks compare a real signal, not zeros


@pytest.mark.slow
def test_grpo_with_tools_resumes_exactly(tool_model, grpo_tasks, tmp_path):
    _, init = tool_model
    args = ["--max_iters=4", "--eval_interval=2"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train_in_process(grpo_tool_args(grpo_tasks, ref, init, *args))
    sigkill_after_checkpoint(grpo_tool_args(grpo_tasks, out, init, *args), 2)
    train_in_process(grpo_tool_args(grpo_tasks, out, "resume", *args))
    assert train_losses(out) == train_losses(ref)
    weights = [load_checkpoint(f"{d}/ckpt.pt")["model"] for d in (ref, out)]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
