"""
Generate from a run directory (ckpt.pt) or an exported HF directory.

    python sample.py --out_dir=out/sft_demo --prompt="你好，你是谁？"
    python sample.py --out_dir=out/sft_demo                   # interactive chat (stdin is a terminal)
    python sample.py --out_dir=out/pretrain_demo --mode=complete --prompt="床前明月光，"
    python sample.py --hf_dir=hf/sft_demo --prompt_file=prompts.txt --num_samples=3

Modes: `chat` renders the prompt with the chat template and stops at <|im_end|>;
`complete` continues plain text until <|endoftext|>. The default is chat for a
model trained with sft/dpo (or an HF directory) whose tokenizer has a chat
template, complete otherwise. Interactive chat keeps the conversation, dropping
whole turns, oldest first, when it no longer fits the context; /reset clears it,
/exit (or end of input) leaves. Replies stream as they are generated.

The functions below (load, reply, complete, ...) are what other scripts call.
"""

import json
import os
import re
import sys
import time
from itertools import takewhile

import torch

import configurator
from chat import load_tokenizer
from checkpoint import load_model

# -----------------------------------------------------------------------------
out_dir = ""  # a run directory (ckpt.pt + tokenizer files) ...
hf_dir = ""  # ... or an HF transformers directory
mode = "auto"  # auto | chat | complete
prompt = ""  # one prompt; with neither prompt nor prompt_file: interactive (terminal) or one prompt per stdin line
prompt_file = ""  # a file with one prompt per line
system = ""  # chat mode: a system message put before the conversation
num_samples = 1  # samples per prompt
max_new_tokens = 256
temperature = 0.8  # 0: greedy
top_k = 0  # 0: off
top_p = 0.9  # 1.0: off
repetition_penalty = 1.0  # 1.0: off; > 1 discourages tokens already in the prompt or reply
seed = 1337
think = "show"  # show | hide: print the <think>...</think> block of a reasoning model's replies or not
device = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto (bfloat16 on a GPU that has it, float16 on other GPUs, float32 on CPU) | float32 | bfloat16 | float16
compile = False  # torch.compile the model (worth it for long generations on a GPU)
# -----------------------------------------------------------------------------
_DEFAULTS = {k: globals()[k] for k in configurator.config_keys(globals())}  # main() leaves these unchanged

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHAT_STAGES = ("sft", "dpo")
THINK_BLOCK = re.compile(r"<think>.*?(?:</think>\s*|\Z)", re.S)  # an unclosed block hides to the end


def has_chat_template(path):
    """Whether the tokenizer files in `path` carry a chat template."""
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
        return True
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def is_chat_model(path, info):
    """Chat by default: a tokenizer with a chat template and a model trained on conversations (sft, dpo, or HF)."""
    return has_chat_template(path) and (info["kind"] == "hf" or info["stage"] in CHAT_STAGES)


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        configurator.fail(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return name


def resolve_dtype(name, device):
    if name != "auto":
        if name not in DTYPES:
            configurator.fail(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def load(path, device="cpu", dtype="float32", compile=False):
    """(model in eval mode, tokenizer, info) from a run directory or an HF directory.

    info: load_model's info plus "chat" (the default mode is chat) and "block_size"
    (the context the model was trained at: prompt + reply must fit in it).
    """
    model, info = load_model(path, device)
    model.to(DTYPES[dtype])
    tokenizer = load_tokenizer(path)
    control = (tokenizer.eot_id, tokenizer.im_start_id, tokenizer.im_end_id)
    if max(control) >= model.cfg.vocab_size:  # a foreign tokenizer that got our special tokens added
        configurator.fail(f"{path}: the chat special tokens (ids {control}) are outside the model's vocabulary "
                          f"of {model.cfg.vocab_size}; fine-tune the model with this tokenizer first")
    if compile:
        model.compile(dynamic=True)
    block_size = (info.get("config") or {}).get("block_size") or model.cfg.max_seq_len
    return model, tokenizer, dict(info, chat=is_chat_model(path, info), block_size=int(block_size))


# -----------------------------------------------------------------------------
# prompts


def chat_prompt_ids(tokenizer, messages):
    """Token ids of a conversation followed by the header of the assistant's reply."""
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    return ids


def fit_history(tokenizer, messages, budget):
    """(messages, prompt ids): the conversation without its oldest whole turns, as few dropped as fit `budget` tokens.

    A leading system message is kept; a turn is a user message and the replies after it.
    (None, ids) when even the last turn alone is too long.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    while True:
        ids = chat_prompt_ids(tokenizer, head + turns)
        if len(ids) <= budget:
            return head + turns, ids
        later_turns = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
        if not later_turns:
            return None, ids
        turns = turns[later_turns[0]:]


def complete_prompt_ids(tokenizer, text):
    """Plain text as the start of a document: pretraining puts <|endoftext|> between documents."""
    return [tokenizer.eot_id] + tokenizer.encode(text)


# -----------------------------------------------------------------------------
# generation


def hide_think(text):
    return THINK_BLOCK.sub("", text)


def stream_text(tokenizer, token_ids, think="show"):
    """Yield the text of a stream of token ids piece by piece, never half a character.

    The running ids are decoded whole and only the new suffix is yielded; while the text
    ends in U+FFFD (the first bytes of a multi-byte character) it waits for the rest.
    With think="hide", nothing of a <think>...</think> block is yielded.
    """
    ids, shown = [], ""
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        text = hide_think(text) if think == "hide" else text
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids)  # the end of the stream: whatever is left, even a broken character
    text = hide_think(text) if think == "hide" else text
    if len(text) > len(shown):
        yield text[len(shown):]


def generate_text(model, tokenizer, prompt_ids, stop_ids, max_new_tokens=256, think="show", on_text=None,
                  max_len=None, **sampling):
    """The text generated after prompt_ids, up to a stop token (not included); on_text(piece) as it streams.

    sampling: temperature, top_k, top_p, repetition_penalty, generator (see Transformer.generate).
    """
    tokens = model.generate(prompt_ids, max_new_tokens, stop_ids=stop_ids, max_len=max_len, **sampling)
    pieces = []
    for piece in stream_text(tokenizer, takewhile(lambda t: t not in stop_ids, tokens), think):
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    return "".join(pieces)


def chat_stop_ids(tokenizer):
    return (tokenizer.im_end_id, tokenizer.eot_id)


def reply(model, tokenizer, messages, **sampling):
    """The assistant's reply to a conversation [{"role", "content"}, ...]; keywords as generate_text."""
    return generate_text(model, tokenizer, chat_prompt_ids(tokenizer, messages), chat_stop_ids(tokenizer), **sampling)


def complete(model, tokenizer, text, **sampling):
    """The continuation of plain text (without the text itself); keywords as generate_text."""
    return generate_text(model, tokenizer, complete_prompt_ids(tokenizer, text), (tokenizer.eot_id,), **sampling)


@torch.no_grad()
def decode_speed(model, prompt_len=16, new_tokens=200, repeats=3):
    """Greedy decode tokens/s at batch 1 with the KV cache (best of `repeats`); every step runs, no stop token."""
    prompt = list(range(1, prompt_len + 1))
    on_gpu = model.lm_head.weight.device.type == "cuda"
    best = 0.0
    for _ in range(repeats):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = sum(1 for _ in model.generate(prompt, new_tokens, temperature=0, max_len=prompt_len + new_tokens))
        if on_gpu:
            torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t0))
    return best


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
        generate_text(model, tokenizer, ids, stop, on_text=_write, max_len=info["block_size"], **settings["sampling"])
        print()


def interactive_chat(model, tokenizer, info, settings, read=input):
    """Multi-turn chat on the terminal: the conversation is kept, oldest whole turns dropped to fit the context."""
    budget = info["block_size"] - settings["sampling"]["max_new_tokens"]
    if budget <= 0:
        configurator.fail(f"max_new_tokens ({settings['sampling']['max_new_tokens']}) leaves no room for a prompt "
                          f"in the context of {info['block_size']} tokens")
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
            text = generate_text(model, tokenizer, ids, chat_stop_ids(tokenizer), on_text=_write,
                                 max_len=info["block_size"], **settings["sampling"])
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n(interrupted; the reply is not kept)")
            continue
        print()
        # the reasoning of earlier turns is not fed back: the answer is what the conversation keeps
        history = messages[len(settings["head"]):] + [{"role": "assistant", "content": hide_think(text)}]


def read_prompts(config):
    if config["prompt"] and config["prompt_file"]:
        configurator.fail("give --prompt or --prompt_file, not both")
    if config["prompt"]:
        return [config["prompt"]]
    if config["prompt_file"]:
        try:
            with open(config["prompt_file"], encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            configurator.fail(f"cannot read prompt file {config['prompt_file']}: {e}")
    elif sys.stdin.isatty():
        return None  # interactive
    else:
        lines = sys.stdin.read().splitlines()
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        configurator.fail("no prompts: the prompt file or stdin holds only empty lines")
    return prompts


def check_config(c):
    if bool(c["out_dir"]) == bool(c["hf_dir"]):
        configurator.fail("give exactly one of --out_dir (a run directory) or --hf_dir (an HF directory)")
    for key, allowed in (("mode", ("auto", "chat", "complete")), ("think", ("show", "hide"))):
        if c[key] not in allowed:
            configurator.fail(f"{key} must be one of {', '.join(allowed)}, got {c[key]!r}")
    if c["num_samples"] < 1 or c["max_new_tokens"] < 1 or c["top_k"] < 0:
        configurator.fail("num_samples and max_new_tokens must be >= 1, top_k >= 0")
    if c["temperature"] < 0 or not 0 < c["top_p"] <= 1 or c["repetition_penalty"] <= 0:
        configurator.fail("temperature must be >= 0, top_p in (0, 1], repetition_penalty > 0")


def main(argv=None):
    c = configurator.configure(dict(_DEFAULTS), argv, quiet=True)
    check_config(c)
    prompts = read_prompts(c)  # None: interactive
    path = c["out_dir"] or c["hf_dir"]
    dev = resolve_device(c["device"])
    model, tokenizer, info = load(path, dev, resolve_dtype(c["dtype"], dev), c["compile"])
    chat = info["chat"] if c["mode"] == "auto" else c["mode"] == "chat"
    generator = torch.Generator(dev).manual_seed(c["seed"])
    settings = {
        "chat": chat, "num_samples": c["num_samples"],
        "head": [{"role": "system", "content": c["system"]}] if c["system"] else [],
        "sampling": dict(max_new_tokens=c["max_new_tokens"], temperature=c["temperature"], top_k=c["top_k"] or None,
                         top_p=c["top_p"], repetition_penalty=c["repetition_penalty"], generator=generator,
                         think=c["think"]),
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
