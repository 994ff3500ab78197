"""
Generation from a trained model: loading it with its tokenizer, turning
messages into prompt ids, streaming text, hiding or keeping the <think> block.
sample.py (the command line), the server, demo.py and export.py share it, so a
reply is the same whichever of them asks.
"""

import json
import os
import re
from itertools import takewhile

import configurator
from checkpoint import load_model
from common import DTYPES
from tokenizer import load_tokenizer

CHAT_STAGES = ("sft", "dpo", "grpo")
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
