"""sample.py and llm_trainer/inference/generation.py: prompts, history truncation, streaming decode, --think, the command line."""

import pytest

from llm_trainer.inference import generation
import sample
from tests.helpers import make_run_dir


@pytest.fixture(scope="module")
def chat_run(made_run):
    return made_run("sft")


@pytest.fixture(scope="module")
def loaded(chat_run):
    return generation.load(chat_run)


def test_streaming_never_prints_half_a_character(loaded):
    _, tok, _ = loaded
    text = "床前明月光，疑是地上霜。🙂 naïve — ok"
    ids = tok.encode(text)
    # the test means something only if some token boundary falls inside a character
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    pieces = list(generation.stream_text(tok, iter(ids)))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_think_hide_drops_the_reasoning_block(loaded):
    _, tok, _ = loaded
    think, end_think = tok.special_ids["<think>"], tok.special_ids["</think>"]
    ids = [think] + tok.encode("\n先算个位：5+1=6。\n") + [end_think] + tok.encode("\n答案是166")
    shown = "".join(generation.stream_text(tok, iter(ids)))
    assert shown == "<think>\n先算个位：5+1=6。\n</think>\n答案是166"
    assert generation.split_think(shown) == ("先算个位：5+1=6。", "答案是166")
    # a block cut off by max_new_tokens hides to the end
    assert generation.split_think("".join(generation.stream_text(tok, iter(ids[:8])))) == (tok.decode(ids[2:8]), "")


class Replay:
    """A model whose generate() replays given token ids."""

    def __init__(self, ids):
        self.ids = ids

    def generate(self, prompt_ids, max_new_tokens, stop_ids=(), **kwargs):
        yield from self.ids[:max_new_tokens]


def test_streamed_reasoning_and_content_add_up_and_stop_strings_cut(loaded):
    """ReplyStream's pieces: raw text, and the same text as reasoning and content deltas, never taken back."""
    _, tok, _ = loaded
    think, end_think = tok.special_ids["<think>"], tok.special_ids["</think>"]
    ids = [think] + tok.encode("\n一二\n\n三\n") + [end_think] + tok.encode("\nthe answer is 42. END more") + [tok.im_end_id]
    stream = generation.ReplyStream(Replay(ids), tok, [], (tok.im_end_id,))
    pieces = list(stream)
    raw = "".join(p.text for p in pieces)
    assert raw == tok.decode(ids[:-1]) and stream.finish_reason == "stop" and stream.tokens == len(ids)
    assert ("".join(p.reasoning for p in pieces), "".join(p.content for p in pieces)) == generation.split_think(raw)
    assert "".join(p.reasoning for p in pieces) == "一二\n\n三"
    cut = generation.ReplyStream(Replay(ids), tok, [], (tok.im_end_id,), stop=[" END", "never"])
    assert "".join(p.content for p in cut) == "the answer is 42." and cut.finish_reason == "stop"
    short = generation.ReplyStream(Replay(ids), tok, [], (tok.im_end_id,), max_new_tokens=4)
    list(short)
    assert short.finish_reason == "length" and short.tokens == 4


def test_history_drops_whole_turns_oldest_first(loaded):
    _, tok, _ = loaded
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} 问题"}, {"role": "assistant", "content": f"answer {i} 回答"}]
    messages = [system] + turns + [{"role": "user", "content": "last"}]
    full = len(generation.chat_prompt_ids(tok, messages))
    kept, ids = generation.fit_history(tok, messages, full)
    assert kept == messages
    kept, ids = generation.fit_history(tok, messages, full - 1)
    assert kept[0] == system and kept[1:] == messages[3:]  # the oldest turn (question + answer) went, whole
    assert ids == generation.chat_prompt_ids(tok, kept) and len(ids) < full
    kept, ids = generation.fit_history(tok, messages, len(generation.chat_prompt_ids(tok, [system, messages[-1]])))
    assert kept == [system, messages[-1]]
    kept, ids = generation.fit_history(tok, messages, 5)
    assert kept is None


def test_default_mode_follows_the_stage(made_run, loaded):
    assert loaded[2]["chat"] and loaded[2]["block_size"] == 256
    assert not generation.load(made_run("pretrain"))[2]["chat"]


def test_seeded_sampling_is_reproducible(loaded):
    import torch

    model, tok, _ = loaded
    messages = [{"role": "user", "content": "你好"}]

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return generation.reply(model, tok, messages, max_new_tokens=20, temperature=1.0, top_p=0.95, generator=g)

    assert draw(1) == draw(1)
    assert len({draw(1), draw(2), draw(3)}) > 1


def test_main_prints_a_reply_and_exits_0(chat_run, tmp_path, capsys):
    assert sample.main([f"--out_dir={chat_run}", "--prompt=你好，你是谁？", "--max_new_tokens=12", "--temperature=0"]) == 0
    out = capsys.readouterr().out
    model, tok, _ = generation.load(chat_run)
    expected = generation.reply(model, tok, [{"role": "user", "content": "你好，你是谁？"}], max_new_tokens=12, temperature=0)
    assert expected and out == expected + "\n"

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("床前明月光，\n\nHello\n", encoding="utf-8")
    assert sample.main([f"--out_dir={chat_run}", "--mode=complete", f"--prompt_file={prompts}",
                        "--num_samples=2", "--max_new_tokens=8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("床前明月光，") and out.count("---------------") == 2 and "\nHello" in out


def test_interactive_chat_keeps_the_conversation(loaded, capsys, monkeypatch):
    model, tok, info = loaded
    prompts = []
    generate = model.generate

    def recording(prompt_ids, *args, **kwargs):
        prompts.append(tok.decode(prompt_ids))
        return generate(prompt_ids, *args, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    lines = iter(["first question", "second question", "/reset", "third question", "/exit", "never read"])
    settings = {"chat": True, "num_samples": 1, "head": [], "max_new_tokens": 10,
                "sampling": {"max_new_tokens": 10, "temperature": 0.0}}
    sample.interactive_chat(model, tok, info, settings, read=lambda _: next(lines))
    assert len(prompts) == 3
    assert "first question" in prompts[1] and "second question" in prompts[1]
    assert "first question" not in prompts[2] and "third question" in prompts[2]
    assert "(conversation cleared)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    [], ["--out_dir=a", "--hf_dir=b"], ["--out_dir=a", "--think=maybe"], ["--out_dir=a", "--top_p=0"],
])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2


def test_whitespace_before_a_think_block_streams_as_it_ends(loaded):
    _, tok, _ = loaded
    think, end_think = tok.special_ids["<think>"], tok.special_ids["</think>"]
    ids = tok.encode("\n ") + [think] + tok.encode("\n一二\n") + [end_think] + tok.encode("\n42") + [tok.im_end_id]
    pieces = list(generation.ReplyStream(Replay(ids), tok, [], (tok.im_end_id,)))
    raw = "".join(p.text for p in pieces)
    assert ("".join(p.reasoning for p in pieces), "".join(p.content for p in pieces)) == generation.split_think(raw)
    assert generation.split_think(raw) == ("一二", "42")


def short_context_run(path, block_size=128):
    """A run directory whose model was trained at a short context, as the demo's are (128-160 tokens)."""
    import torch

    from llm_trainer.core.checkpoint import save_checkpoint

    run = make_run_dir(path, stage="sft")
    state = torch.load(f"{run}/ckpt.pt", map_location="cpu", weights_only=False)
    state["config"]["block_size"] = block_size
    save_checkpoint(run, state)
    return run


def test_interactive_chat_fits_a_short_context_by_default(tmp_path, capsys, monkeypatch):
    """The README's `python sample.py --out_dir=out/demo/sft`: the default reply length fits a 128-token context."""
    run = short_context_run(tmp_path / "short")
    lines = iter(["你好，你是谁？", "What is 2 + 3? " * 6, "/exit"])
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert sample.main([f"--out_dir={run}", "--temperature=0"]) == 0
    assert capsys.readouterr().out.strip()
