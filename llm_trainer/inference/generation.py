"""
Generation from a trained model: loading it with its tokenizer, turning
messages into prompt ids, streaming text, hiding or keeping the <think> block,
finding the tool calls in a reply. sample.py (the command line), the server,
demo.py and export.py share it, so a reply is the same whichever of them asks.
"""

import itertools
import json
import os
import re
from dataclasses import dataclass, field

import configurator
from llm_trainer.core.checkpoint import load_model
from llm_trainer.core.common import DTYPES
from llm_trainer.data.tokenizer import load_tokenizer

CHAT_STAGES = ("sft", "dpo", "grpo")


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
    model, info = load_model(path, device, head="lm")
    model.to(DTYPES[dtype])
    tokenizer = load_tokenizer(path)
    control = (tokenizer.eot_id, tokenizer.im_start_id, tokenizer.im_end_id)
    if max(control) >= model.mcfg.vocab_size:  # a foreign tokenizer that got our special tokens added
        configurator.fail(f"{path}: the chat special tokens (ids {control}) are outside the model's vocabulary "
                          f"of {model.mcfg.vocab_size}; fine-tune the model with this tokenizer first")
    if compile:
        model.compile(dynamic=True)
    block_size = (info.get("config") or {}).get("block_size") or model.mcfg.max_seq_len
    return model, tokenizer, dict(info, chat=is_chat_model(path, info), block_size=int(block_size))


# -----------------------------------------------------------------------------
# prompts


def chat_prompt_ids(tokenizer, messages, tools=None):
    """Token ids of a conversation followed by the header of the assistant's reply; tools: the schemas offered."""
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools)
    return ids


def fit_history(tokenizer, messages, budget, tools=None):
    """(messages, prompt ids): the conversation without its oldest whole turns, as few dropped as fit `budget` tokens.

    A leading system message is kept (and the tools offered, in the system turn); a turn is a user message and the
    replies (and tool results) after it. (None, ids) when even the last turn alone is too long.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    while True:
        ids = chat_prompt_ids(tokenizer, head + turns, tools)
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


def split_think(text, final=True):
    """(reasoning, content) of a reply's text: the inside of a leading <think> block, without the newline the chat
    template puts after <think> and before </think>, and what follows the block, without the template's newline
    after </think>; an unclosed block is all reasoning. final=False (a reply still streaming) holds back what may
    still turn out to be the template's (leading whitespace before a <think>, the newlines), so that what was shown
    never has to be taken back."""
    body = text.lstrip()
    if not final and "<think>".startswith(body):
        return "", ""
    if not body.startswith("<think>"):
        return "", text
    body = body[len("<think>"):]
    body = body[1:] if body.startswith("\n") else body
    if "</think>" not in body:
        return (body if final else body.rstrip("\n")), ""
    reasoning, content = body.split("</think>", 1)
    return reasoning[:-1] if reasoning.endswith("\n") else reasoning, content[1:] if content.startswith("\n") else content


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_CALL_OPEN = "<tool_call>"


def parse_call(text):
    """{"name", "arguments"} of the inside of a <tool_call> block, or None when it is not a call: JSON of an object
    with a non-empty string "name" and "arguments" an object (or the JSON text of one, or absent: {})."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"name": call["name"], "arguments": args} if isinstance(args, dict) else None


def _scan_calls(text, final):
    """(text without its calls, the calls, how much of `text` is settled): split_tool_calls, and the length of the
    prefix of `text` whose fate is known (the rest is held back)."""
    kept, calls, pos = [], [], 0
    for m in _TOOL_CALL.finditer(text):
        call = parse_call(m.group(1))
        if call is None:  # not a call: stays text
            continue
        before = text[pos:m.start()]
        kept.append(before[:-1] if before.endswith("\n") else before)  # the chat template's newline before a call
        calls.append(call)
        pos = m.end()
    rest, settled = text[pos:], len(text)
    if not final:
        opened = rest.rfind(_CALL_OPEN)
        if opened >= 0 and "</tool_call>" not in rest[opened:]:
            rest = rest[:opened]
        rest = rest[: len(rest) - max((n for n in range(1, len(_CALL_OPEN)) if rest.endswith(_CALL_OPEN[:n])),
                                      default=0)]
        rest = rest[:-1] if rest.endswith("\n") else rest
        settled = pos + len(rest)
    return "".join(kept) + rest, calls, settled


def split_tool_calls(text, final=True):
    """(text, calls) of a reply's content: calls are its <tool_call> blocks whose inside is a call (parse_call), taken
    out of the text with the newline the chat template puts before each; a block that is not a call (not valid
    JSON, no name) stays text, as does an unclosed one. final=False (a reply still streaming): what may still turn
    out to be a call (an unclosed block, the start of its tag, a newline before it) is held back, so that what was
    shown never has to be taken back."""
    text, calls, _ = _scan_calls(text, final)
    return text, calls


def split_reply(text):
    """(reasoning, content, calls) of a whole reply's text: split_think, then split_tool_calls of the content. A call
    is what the assistant does once it has reasoned (Qwen's and Hermes' convention, as llama.cpp's and vLLM's
    parsers read it): a <tool_call> block inside the <think> block, closed or not, is reasoning, never run.
    ReplyStream reads a streaming reply the same way; GRPO's rollouts read their completions with this."""
    reasoning, content = split_think(text)
    content, calls = split_tool_calls(content)
    return reasoning, content, calls


def call_start(tokenizer, name=None):
    """(text, ids) a reply is made to start with so that it is a tool call (name=None: of the model's choice) or a
    call of function `name`: the chat template's `<tool_call>\n{"name":` and, for a name, ` "NAME", "arguments":`.
    Both end where the text of the whole call is split anyway (before the space that starts the next word), so the
    ids are those the template gives the whole call."""
    text = '<tool_call>\n{"name":' + ("" if name is None else " " + json.dumps(name, ensure_ascii=False)
                                      + ', "arguments":')
    return text, [tokenizer.tool_tag_ids["<tool_call>"]] + tokenizer.encode(text[len("<tool_call>"):])


def tool_call_message(content, calls):
    """The assistant message of a reply that calls tools, as the chat template and OpenAI's API take it."""
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": call} for call in calls]}


def stream_text(tokenizer, token_ids):
    """Yield the text of a stream of token ids piece by piece, never half a character.

    The running ids are decoded whole and only the new suffix is yielded; while the text
    ends in U+FFFD (the first bytes of a multi-byte character) it waits for the rest.
    """
    ids, shown = [], ""
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids)  # the end of the stream: whatever is left, even a broken character
    if len(text) > len(shown):
        yield text[len(shown):]


@dataclass
class Piece:
    """What a reply added since the last piece: its raw text, that text seen as reasoning and content
    (split_think: the <think> block's inside, and the answer; with tools, the content without its tool calls),
    the TokenLogprobs of the tokens it took (when asked for), the tool calls it completed (with tools), and what a
    person is shown of it with its reasoning (the <think> block as written, tags and all, then the content: the
    raw text, but for the calls, which the tools' runner shows)."""

    text: str
    reasoning: str
    content: str
    logprobs: list
    calls: list = field(default_factory=list)
    shown: str = ""


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits: before temperature, top_p or the
    penalties), the `top` most likely tokens' [(id, logprob)], and where its text starts in the reply."""

    id: int
    logprob: float
    top: list
    offset: int


class ReplyStream:
    """A reply being generated after prompt_ids: iterate it for Pieces, as they stream. Afterwards, finish_reason
    is "stop" (a stop token, or a stop string in the content, which is cut before it) or "length" (max_new_tokens,
    or the context is full), and tokens says how many tokens were generated. cancelled() is asked after every
    token: true ends the reply there. split=False: a plain continuation, all of it content (no <think> split),
    stop strings searched in all of it. top_logprobs: None, or n >= 0: each piece carries its tokens' TokenLogprobs
    with the n most likely alternatives. tools=True: the content's tool calls are taken out of it (split_tool_calls)
    and handed out in Piece.calls (all of them in .calls), a call's tokens' log-probabilities with the content piece
    after it. prefix: text the reply starts with whose ids end prompt_ids (a forced start, see call_start): read
    with what follows (a call it opens is parsed whole), never yielded as a Piece's text. sampling: temperature,
    top_k, top_p, repetition_penalty, frequency_penalty, presence_penalty, generator (see Transformer.generate and
    model.Penalties)."""

    def __init__(self, model, tokenizer, prompt_ids, stop_ids, max_new_tokens=256, stop=(), max_len=None,
                 cancelled=None, split=True, top_logprobs=None, tools=False, prefix="", **sampling):
        self.model, self.tokenizer, self.prompt_ids, self.stop_ids = model, tokenizer, prompt_ids, stop_ids
        self.max_new_tokens, self.stop, self.max_len, self.sampling = max_new_tokens, tuple(stop), max_len, sampling
        self.cancelled, self.split, self.top_logprobs = cancelled or (lambda: False), split, top_logprobs
        self.finish_reason, self.tokens, self.text, self._logits, self._logprobs = "length", 0, prefix, None, []
        self.tools, self.calls = tools, []

    def _tokens(self):
        keep = (lambda logits: setattr(self, "_logits", logits)) if self.top_logprobs is not None else None
        for token in self.model.generate(self.prompt_ids, self.max_new_tokens, stop_ids=self.stop_ids,
                                         max_len=self.max_len, on_logits=keep, **self.sampling):
            self.tokens += 1
            if token in self.stop_ids:
                self.finish_reason = "stop"
                return
            if keep is not None:
                self._logprobs.append(self._logprob(token))
            yield token
            if self.cancelled():
                return

    def _logprob(self, token):
        logprobs = self._logits[0].log_softmax(-1)
        top = logprobs.topk(self.top_logprobs) if self.top_logprobs else None
        return TokenLogprob(token, float(logprobs[token]),
                            list(zip(top.indices.tolist(), top.values.tolist())) if top else [], len(self.text))

    def _cut(self, content, final):
        """content up to the first stop string (and whether there was one); while streaming, without a tail
        that may be the start of one."""
        hits = [content.find(s) for s in self.stop if s in content]
        if hits:
            return content[: min(hits)], True
        if final:
            return content, False
        held = max((n for s in self.stop for n in range(1, len(s)) if content.endswith(s[:n])), default=0)
        return content[: len(content) - held], False

    def __iter__(self):
        sent = ["", "", ""]
        pieces = stream_text(self.tokenizer, self._tokens())
        for final, piece in itertools.chain(((False, p) for p in pieces), [(True, "")]):
            self.text += piece
            reasoning, whole = split_think(self.text, final) if self.split else ("", self.text)
            content, stopped = self._cut(whole, final)
            settled, calls = len(content), []
            if self.tools:
                content, calls, settled = _scan_calls(content, final or stopped)
            # a token's log-probability goes with its text: held while that text is, dropped with it past a stop
            known = len(self.text) - (len(whole) - settled)
            logprobs = [lp for lp in self._logprobs if lp.offset < known]
            self._logprobs = self._logprobs[len(logprobs):]
            # the <think> block as written (split_think's content is the text's end), once the text opens with one
            block = len(self.text) - len(whole) if self.split and self.text.lstrip().startswith("<think>") else 0
            shown = self.text[:block] + content
            yield Piece(piece, reasoning[len(sent[0]):], content[len(sent[1]):], logprobs, calls[len(self.calls):],
                        shown[len(sent[2]):])
            sent, self.calls = [reasoning, content, shown], calls
            if stopped:
                self.finish_reason = "stop"
                return


def reply_room(context, cap):
    """The tokens a conversation trimmed to fit the context leaves for the reply when nobody said: half the
    context, at most cap."""
    return max(1, min(cap, context // 2))


def generate_text(model, tokenizer, prompt_ids, stop_ids, max_new_tokens=256, think="show", on_text=None,
                  max_len=None, **sampling):
    """The text generated after prompt_ids, up to a stop token (not included); on_text(piece) as it streams.
    think="hide": the answer only, without the <think> block (show: Piece.shown). sampling: as ReplyStream."""
    shown = []
    for piece in ReplyStream(model, tokenizer, prompt_ids, stop_ids, max_new_tokens, max_len=max_len, **sampling):
        text = piece.shown if think == "show" else piece.content
        if text:
            shown.append(text)
            if on_text is not None:
                on_text(text)
    return "".join(shown)


def reply_with_tools(model, tokenizer, messages, tools, max_steps=4, think="show", on_text=None, on_call=None,
                     max_len=None, **sampling):
    """The messages the assistant adds to a conversation when it may call `tools` (inference/tools.py's Tools):
    each reply's calls are run and their results added as tool messages, until a reply calls nothing, or after
    max_steps replies with calls (the last reply's calls are then left as text), or when the context is full.
    on_text(piece) sees each reply's text as it streams (think="hide": without its <think> block), on_call(call,
    result) each call run; sampling: as ReplyStream."""
    added, stop = [], chat_stop_ids(tokenizer)
    for step in range(max_steps + 1):
        ids = chat_prompt_ids(tokenizer, messages + added, tools.schemas)
        if len(ids) >= (max_len or model.mcfg.max_seq_len):
            break
        stream = ReplyStream(model, tokenizer, ids, stop, max_len=max_len, tools=step < max_steps, **sampling)
        content = []
        for piece in stream:
            content.append(piece.content)
            shown = piece.shown if think == "show" else piece.content
            if shown and on_text is not None:
                on_text(shown)
        if not stream.calls:
            return added + [{"role": "assistant", "content": "".join(content)}]
        added.append(tool_call_message("".join(content), stream.calls))
        for call in stream.calls:
            result = tools.run(call)
            added.append({"role": "tool", "content": result})
            if on_call is not None:
                on_call(call, result)
    return added


def chat_stop_ids(tokenizer):
    return (tokenizer.im_end_id, tokenizer.eot_id)


def completion_text(tokenizer, ids, stop_ids):
    """The text of generated ids (generate_batch's rows), a final stop token removed."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids)


def reply(model, tokenizer, messages, **sampling):
    """The assistant's reply to a conversation [{"role", "content"}, ...]; keywords as generate_text."""
    return generate_text(model, tokenizer, chat_prompt_ids(tokenizer, messages), chat_stop_ids(tokenizer), **sampling)
