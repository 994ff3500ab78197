"""
Generate from a run directory (ckpt.pt) or an exported HF directory.

    python sample.py --out_dir=out/demo/sft --prompt="你好，你是谁？"
    python sample.py --out_dir=out/demo/sft                   # interactive chat (stdin is a terminal)
    python sample.py --out_dir=out/demo/pretrain --mode=complete --prompt="床前明月光，"
    python sample.py --hf_dir=out/demo/hf --prompt_file=prompts.txt --num_samples=3
    python sample.py --out_dir=out/demo/sft --tools=calculator --prompt="What is 147 + 85?"

Modes: `chat` renders the prompt with the chat template and stops at <|im_end|>;
`complete` continues plain text until <|endoftext|>. The default is chat for a
model trained with sft/dpo (or an HF directory) whose tokenizer has a chat
template, complete otherwise. Interactive chat keeps the conversation, dropping
whole turns, oldest first, when it no longer fits the context; /reset clears it,
/exit (or end of input) leaves. Replies stream as they are generated.

Tools (chat mode): --tools=calculator (the built-in, safe arithmetic) or --tools=my_tools.py (its public functions,
each with type hints and a docstring; llm_trainer/inference/tools.py) are offered to the model; a reply's calls
are run, shown as [name(arguments) -> result], and their results fed back, until a reply calls nothing (at most
max_tool_steps replies with calls). A call that is not valid JSON is shown as the text it is.

What turns messages into ids and ids into streamed text is llm_trainer/inference/generation.py's,
shared with the server and demo.py.
"""

import json
import sys

import torch

import configurator
from llm_trainer.core.common import dtype_name, resolve_device, resolve_dtype
from llm_trainer.inference.generation import (chat_prompt_ids, chat_stop_ids, complete_prompt_ids, fit_history,
                                              generate_text, load, reply_room, reply_with_tools, split_think)
from llm_trainer.data.tokenizer import with_tools
from llm_trainer.inference.tools import Tools

# -----------------------------------------------------------------------------
out_dir = ""  # a run directory (ckpt.pt + tokenizer files) ...
hf_dir = ""  # ... or an HF transformers directory
mode = "auto"  # auto | chat | complete
prompt = ""  # one prompt; with neither prompt nor prompt_file: interactive (terminal) or one prompt per stdin line
prompt_file = ""  # a file with one prompt per line
system = ""  # chat mode: a system message put before the conversation
num_samples = 1  # samples per prompt
max_new_tokens = 0  # 0: what the context leaves, at most 256 (interactive chat keeps half the context for a reply)
temperature = 0.8  # 0: greedy
top_k = 0  # 0: off
top_p = 0.9  # 1.0: off
repetition_penalty = 1.0  # 1.0: off; > 1 discourages tokens already in the prompt or reply (transformers')
frequency_penalty = 0.0  # -2..2, 0: off; each logit minus this times how often the reply has generated it (OpenAI's)
presence_penalty = 0.0  # -2..2, 0: off; each logit minus this once the reply has generated it (OpenAI's)
seed = 1337
think = "show"  # show | hide: print the <think>...</think> block of a reasoning model's replies or not
tools = ""  # chat mode: tools the model may call: calculator, a .py file of functions, or several comma-separated
max_tool_steps = 4  # with tools: replies whose calls are run, at most, before the answer
device = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto (bfloat16 on a GPU that has it, float16 on other GPUs, float32 on CPU) | float32 | bfloat16 | float16
compile = False  # torch.compile the model (worth it for long generations on a GPU)
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())
AUTO_MAX_NEW_TOKENS = 256  # max_new_tokens=0: a reply's tokens at most (fewer when the context leaves fewer)


# -----------------------------------------------------------------------------
# the command line


def _write(piece):
    sys.stdout.write(piece)
    sys.stdout.flush()


def run_prompt(model, tokenizer, info, text, settings):
    """Print num_samples generations for one prompt, streaming."""
    for i in range(settings["num_samples"]):
        if i:
            print("\n---------------")
        if settings["chat"]:
            messages = settings["head"] + [{"role": "user", "content": text}]
            ids = chat_prompt_ids(tokenizer, messages)
            stop = chat_stop_ids(tokenizer)
        else:
            ids, stop = complete_prompt_ids(tokenizer, text), (tokenizer.eot_id,)
            _write(text)
        if len(ids) >= info["block_size"]:
            configurator.fail(f"the prompt is {len(ids)} tokens; the model's context is {info['block_size']}")
        if settings["chat"] and settings.get("tools"):
            answer(model, tokenizer, info, messages, settings)
        else:
            generate_text(model, tokenizer, ids, stop, on_text=_write, max_len=info["block_size"], **settings["sampling"])
        print()


def answer(model, tokenizer, info, messages, settings):
    """The assistant's messages (replies, tool results) after `messages`, streamed; with tools, the calls run."""
    if not settings.get("tools"):
        text = generate_text(model, tokenizer, chat_prompt_ids(tokenizer, messages), chat_stop_ids(tokenizer),
                             on_text=_write, max_len=info["block_size"], **settings["sampling"])
        return [{"role": "assistant", "content": split_think(text)[1]}]
    return reply_with_tools(model, tokenizer, messages, settings["tools"], settings["max_tool_steps"], on_text=_write,
                            on_call=show_call, max_len=info["block_size"], **settings["sampling"])


def show_call(call, result):
    _write(f"\n[{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}) -> {result}]\n")


def interactive_chat(model, tokenizer, info, settings, read=None):
    """Multi-turn chat on the terminal: the conversation is kept, oldest whole turns dropped to fit the context
    with room for a reply (max_new_tokens, or reply_room's share)."""
    read = read or input
    wanted = settings["max_new_tokens"]
    budget = info["block_size"] - (wanted or reply_room(info["block_size"], AUTO_MAX_NEW_TOKENS))
    if budget <= 0:
        configurator.fail(f"max_new_tokens ({wanted}) leaves no room for a prompt in the context of "
                          f"{info['block_size']} tokens")
    try:
        import readline  # noqa: F401 -- line editing and history for input()
    except ImportError:
        pass
    print("chat: /reset clears the conversation, /exit leaves", file=sys.stderr)
    history = []
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if not command:
            continue
        messages, ids = fit_history(tokenizer, settings["head"] + history + [{"role": "user", "content": line}], budget)
        if messages is None:
            print(f"(that message is {len(ids)} tokens with the system prompt; at most {budget} fit)")
            continue
        try:
            added = answer(model, tokenizer, info, messages, settings)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n(interrupted; the reply is not kept)")
            continue
        print()
        # the reasoning of earlier turns is not fed back: the answer (and the calls) is what the conversation keeps
        history = messages[len(settings["head"]):] + added


def read_prompts(cfg):
    if cfg["prompt"] and cfg["prompt_file"]:
        configurator.fail("give --prompt or --prompt_file, not both")
    if cfg["prompt"]:
        return [cfg["prompt"]]
    if cfg["prompt_file"]:
        try:
            with open(cfg["prompt_file"], encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            configurator.fail(f"cannot read prompt file {cfg['prompt_file']}: {e}")
    elif sys.stdin.isatty():
        return None  # interactive
    else:
        lines = sys.stdin.read().splitlines()
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        configurator.fail("no prompts: the prompt file or stdin holds only empty lines")
    return prompts


def check_config(cfg):
    if bool(cfg["out_dir"]) == bool(cfg["hf_dir"]):
        configurator.fail("give exactly one of --out_dir (a run directory) or --hf_dir (an HF directory)")
    for key, allowed in (("mode", ("auto", "chat", "complete")), ("think", ("show", "hide"))):
        if cfg[key] not in allowed:
            configurator.fail(f"{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    if cfg["num_samples"] < 1 or cfg["max_new_tokens"] < 0 or cfg["top_k"] < 0 or cfg["max_tool_steps"] < 0:
        configurator.fail("num_samples must be >= 1, max_new_tokens >= 0 (0: what the context leaves), top_k >= 0, "
                          "max_tool_steps >= 0")
    if cfg["temperature"] < 0 or not 0 < cfg["top_p"] <= 1 or cfg["repetition_penalty"] <= 0:
        configurator.fail("temperature must be >= 0, top_p in (0, 1], repetition_penalty > 0")
    for key in ("frequency_penalty", "presence_penalty"):
        if not -2 <= cfg[key] <= 2:
            configurator.fail(f"{key} must be in [-2, 2] (as the OpenAI API's), got {cfg[key]!r}")


def main(argv=None):
    cfg = configurator.configure(_DEFAULTS, argv)
    check_config(cfg)
    prompts = read_prompts(cfg)  # None: interactive
    path = cfg["out_dir"] or cfg["hf_dir"]
    dev = resolve_device(cfg["device"])
    model, tokenizer, info = load(path, dev, dtype_name(resolve_dtype(cfg["dtype"], dev)), cfg["compile"])
    chat = info["chat"] if cfg["mode"] == "auto" else cfg["mode"] == "chat"
    if cfg["tools"] and not chat:
        configurator.fail("tools are offered in chat mode: a chat model, or --mode=chat")
    offered = Tools(cfg["tools"]) if cfg["tools"] else None
    generator = torch.Generator(dev).manual_seed(cfg["seed"])
    settings = {
        "chat": chat, "num_samples": cfg["num_samples"], "max_new_tokens": cfg["max_new_tokens"],
        # the tools' schemas ride on the system message: every prompt offers them, trimmed or not
        "head": with_tools([{"role": "system", "content": cfg["system"]}] if cfg["system"] else [],
                           offered and offered.schemas),
        "tools": offered, "max_tool_steps": cfg["max_tool_steps"],
        "sampling": dict(max_new_tokens=cfg["max_new_tokens"] or AUTO_MAX_NEW_TOKENS, temperature=cfg["temperature"],
                         top_k=cfg["top_k"] or None, top_p=cfg["top_p"], repetition_penalty=cfg["repetition_penalty"],
                         frequency_penalty=cfg["frequency_penalty"], presence_penalty=cfg["presence_penalty"],
                         generator=generator, think=cfg["think"]),
    }
    kind = f"{info['stage']} run" if info["kind"] == "run" else "HF model"
    print(f"{path}: {kind}, {model.num_params() / 1e6:.1f}M params, {'chat' if chat else 'complete'} mode, {dev}",
          file=sys.stderr)
    if prompts is None:
        if not chat:
            configurator.fail("complete mode needs --prompt or --prompt_file (interactive mode is chat)")
        interactive_chat(model, tokenizer, info, settings)
    else:
        for text in prompts:
            run_prompt(model, tokenizer, info, text, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
