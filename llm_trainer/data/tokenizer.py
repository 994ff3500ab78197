"""
The tokenizer and the chat format it renders, shared by prepare.py, the
generation code (sample.py, the server) and export.py.

ChatML, one message after another:

    <|im_start|>{role}\n{content}<|im_end|>\n

An assistant message with `reasoning_content` renders its content as
`<think>\n{reasoning}\n</think>\n{content}`. The same format lives in the
Jinja chat template (ChatTokenizer.chat_template), saved with the tokenizer,
so that `transformers.AutoTokenizer.apply_chat_template(..., tokenize=True)`
gives exactly the ids that render_chat() gives, hence exactly the training data.

Tool calls follow Qwen2.5's (Hermes) layout, which llama.cpp, vLLM and ollama
parse. The tools' JSON schemas go into the system turn (after the system
message's content, if any; TOOLS_PREAMBLE, one schema a line, TOOLS_POSTAMBLE);
an assistant message's `tool_calls` follow its content, each as

    \n<tool_call>\n{"name": NAME, "arguments": ARGUMENTS}\n</tool_call>

(no leading \n for a first call after empty content), the arguments verbatim
when they are a string (OpenAI's JSON text), else as json.dumps writes them; a
run of `tool` messages is one user turn of
`\n<tool_response>\n{content}\n</tool_response>` blocks. The tools are given to
render_chat(tools=...) or apply_chat_template(tools=...), or carried by a
leading system message's "tools" key (MiniMind's convention; how prepare.py's
records hold them). A conversation without tools renders as it always did.

Special token strings typed inside message content stay text: `<|im_end|>`
in a user message is encoded as ordinary pieces, never as the control token
(a user cannot forge a turn). The one exception is the tags an assistant
writes (REPLY_TAGS: `<think>`, `</think>`, `<answer>`, `</answer>` and the
four tool tags) inside assistant messages: distillation data writes them
inline, and they must be single tokens there for `think_tag_weight` and for
what a model wrote to render back to its own ids. transformers renders the
template to a string and then finds special tokens in it, so the saved
template escapes such strings in content (TEXT_ESCAPE, an invisible
separator, after their first character) and the saved tokenizer.json's
normalizer removes the escape again before the text is encoded, after the
template's own special tokens have been found: the content's strings come
out as text, the same ids as render_chat(). Tools that do not run the
normalizer (llama.cpp) see the escape as text.

The tool tags are added tokens that are not "special" (as in Qwen2.5), so
that decoding with skip_special_tokens keeps a call's text for the parsers of
other tools.

Loss mask: 1 exactly on the tokens of assistant replies (content, think
block and tool calls included) and the reply's closing `<|im_end|>`; 0 on
role headers (`<|im_start|>assistant\n`), on the `\n` after `<|im_end|>` and
on every system/user/tool token (the tool schemas and results). A token that
straddles the header/reply boundary (a reply that starts with whitespace, or a
SentencePiece model that turns the header's `\n` into the space before the
reply's first word) carries reply text, so it is a target.
"""

import hashlib
import itertools
import json
import os
import re

import numpy as np
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

import configurator
from llm_trainer.core.files import write_json

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
REPLY_TAGS = REASONING_TAGS + TOOL_TAGS  # tokens, not text, where an assistant message writes them
_PIECE_CHARS = 1 << 16  # a longer text is encoded in pieces of about this many characters (where the ids stay the same)
# Where GPT-2's pre-tokenizer regex always splits, whatever comes before and after: before a space between two
# non-blank characters, and between CJK punctuation and a letter or digit (text without spaces).
_CUT = re.compile(r"(?<=\S) (?=\S)|(?<=[。，、！？；：])(?=[^\W_])")

TEXT_ESCAPE = "\u2063"  # INVISIBLE SEPARATOR, put after the first character of a special-token string in content

# The system turn's tool block, Qwen2.5's words (the <tool_call> tags in them are tokens)
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_POSTAMBLE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                   "\"arguments\": <args-json-object>}\n</tool_call>")


def _jinja_str(s):
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(text_only, reply_text_only):
    """The chat template (Jinja) in which the strings of `text_only` (in an assistant message: of
    `reply_text_only`) are escaped with TEXT_ESCAPE wherever message content holds them."""
    def jinja_list(strings):
        return "[" + ", ".join(_jinja_str(t) for t in strings) + "]"

    plain = jinja_list(text_only)
    return (
        "{%- macro text(s, specials) -%}"
        "{%- set ns = namespace(s=s if s is string else '') -%}"
        "{%- if s is not string and s is not none -%}"  # OpenAI's content parts: their text, as serve.py joins them
        "{%- for part in s -%}"
        "{%- if part['type'] != 'text' -%}{{- raise_exception('only text content parts can be rendered') -}}"
        "{%- endif -%}"
        "{%- set ns.s = ns.s + part['text'] -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- for t in specials -%}"
        "{%- set ns.s = ns.s | replace(t, t[0] + '" + TEXT_ESCAPE + "' + t[1:]) -%}"
        "{%- endfor -%}"
        "{{- ns.s -}}"
        "{%- endmacro -%}"
        # a call as {"name": ..., "arguments": ...}: OpenAI's {"function": {...}} or the function itself (MiniMind)
        "{%- macro call_json(call, specials) -%}"
        "{%- set f = call['function'] if call['function'] is defined else call -%}"
        "{%- set args = f['arguments'] if f['arguments'] is defined else {} -%}"
        "{{- text('{\"name\": ' + f['name'] | tojson + ', \"arguments\": ' + (args if args is string else args | tojson)"
        " + '}', specials) -}}"
        "{%- endmacro -%}"
        "{%- set tool_list = tools if tools else (messages[0]['tools'] if messages and messages[0]['role'] == 'system'"
        " and messages[0]['tools'] is defined and messages[0]['tools'] else []) -%}"
        "{%- set system_first = tool_list and messages and messages[0]['role'] == 'system' -%}"
        "{%- if tool_list -%}"
        "{{- '<|im_start|>system\\n' -}}"
        "{%- if system_first -%}{%- set head = text(messages[0]['content'], " + plain + ") -%}"
        "{%- if head -%}{{- head + '\\n\\n' -}}{%- endif -%}{%- endif -%}"
        "{{- " + _jinja_str(TOOLS_PREAMBLE) + " -}}"
        "{%- for tool in tool_list -%}{{- '\\n' + text(tool | tojson, " + plain + ") -}}{%- endfor -%}"
        "{{- " + _jinja_str(TOOLS_POSTAMBLE + "<|im_end|>\n") + " -}}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if not (loop.first and system_first) -%}"
        "{%- set specials = " + jinja_list(reply_text_only) + " if message['role'] == 'assistant' else " + plain + " -%}"
        "{%- if message['role'] == 'tool' -%}"
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
        "{{- '\\n<tool_response>\\n' + text(message['content'], specials) + '\\n</tool_response>' -}}"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- else -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined"
        " and message['reasoning_content'] -%}"
        "{{- '<think>\\n' + text(message['reasoning_content'], specials) + '\\n</think>\\n' -}}"
        "{%- endif -%}"
        "{%- set content = text(message['content'], specials) -%}"
        "{{- content -}}"
        "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}"
        "{%- for call in message['tool_calls'] -%}"
        "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
        "{{- '<tool_call>\\n' + call_json(call, specials) + '\\n</tool_call>' -}}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def with_tools(messages, tools):
    """The conversation with `tools` (OpenAI-style schemas) carried by its leading system message, as render_chat()
    reads them (one with empty content is put first when there is none); messages as they are without tools."""
    if not tools:
        return messages
    if messages and messages[0]["role"] == "system":
        return [dict(messages[0], tools=list(tools))] + list(messages[1:])
    return [{"role": "system", "content": "", "tools": list(tools)}] + list(messages)


def call_json(call):
    """A tool call's text inside <tool_call>: {"name": ..., "arguments": ...}, from OpenAI's {"function": {"name",
    "arguments"}} or {"name", "arguments"}; arguments a string are put verbatim (OpenAI's JSON text)."""
    f = call.get("function", call)
    args = f.get("arguments", {})
    return ('{"name": ' + json.dumps(f["name"], ensure_ascii=False) + ', "arguments": '
            + (args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)) + "}")


class ChatTokenizer:
    """A `tokenizers.Tokenizer` with the chat special tokens, plain-text encoding and ChatML rendering."""

    def __init__(self, tokenizer):
        # a copy (adding tokens must not touch the caller's), without the unescaping that save() adds for transformers
        spec = json.loads(tokenizer.to_str())
        spec["normalizer"] = _without_unescape(spec.get("normalizer"))
        tok = Tokenizer.from_str(json.dumps(spec))
        missing = [t for t in SPECIAL_TOKENS + TOOL_TAGS if tok.token_to_id(t) is None]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + TOOL_TAGS])
        spec = json.loads(tok.to_str())
        for a in spec["added_tokens"]:  # the tool tags as Qwen2.5 has them: matched whole, but not "special"
            if a["content"] in TOOL_TAGS:
                a.update(special=False, normalized=False)
        tok = Tokenizer.from_str(json.dumps(spec))
        self._tok = tok
        self.added_special_tokens = len(missing)
        self.special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.tool_tag_ids = {t: tok.token_to_id(t) for t in TOOL_TAGS}
        self.eot_id = self.special_ids["<|endoftext|>"]
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.im_end_id = self.special_ids["<|im_end|>"]
        self.reasoning_tag_ids = [self.special_ids[t] for t in REASONING_TAGS]
        self._tag_ids = {**self.special_ids, **self.tool_tag_ids}  # what a "special" piece of a layout is

        added = spec["added_tokens"]
        self.vocab_size = max([tok.get_vocab_size(with_added_tokens=True)] + [a["id"] + 1 for a in added])
        specials = {a["content"] for a in added if a["special"]} | set(SPECIAL_TOKENS) | set(TOOL_TAGS)
        # Internal copies without post-processing (no BOS, no offset trimming), truncation or padding.
        spec.update(post_processor=None, truncation=None, padding=None)
        self._full = _from_spec(spec, added)
        self._plain = _from_spec(spec, [a for a in added if a["content"] not in specials])
        pre = spec.get("pre_tokenizer") or {}
        # a text cut at _CUT encodes to the same ids in pieces: byte-level BPE's GPT-2 split alone, nothing before it
        self._cuttable = (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
                          and pre.get("use_regex", True) and not pre.get("add_prefix_space")
                          and all(a["content"] in specials for a in added))
        self._reply = _from_spec(spec, [a for a in added if a["content"] not in specials or a["content"] in REPLY_TAGS])
        self._special_re = _alternation(specials)
        self._control_re = _alternation(specials - set(REPLY_TAGS))
        # what the saved chat template escapes in content, longest first (one string inside another: escaped first)
        self._escaped = sorted((t for t in specials if len(t) > 1), key=lambda t: (-len(t), t))
        self.chat_template = chat_template(self._escaped, [t for t in self._escaped if t not in REPLY_TAGS])

    # -- plain text -----------------------------------------------------------------------------
    def encode(self, text):
        """Token ids of plain text; special-token strings in it are encoded as ordinary text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """encode() of many texts at once (the same ids, faster)."""
        return [e.ids for e in self._plain.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts, max_tokens=0):
        """encode() of many texts as uint32 arrays, in memory bounded by _PIECE_CHARS for a byte-level BPE
        tokenizer: a longer text is encoded piece by piece, cut where the pre-tokenizer splits anyway (the same ids),
        and only as far as max_tokens when that is given (then at least its first max_tokens ids are right)."""
        texts = list(texts)
        out = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= _PIECE_CHARS or not self._cuttable]
        for i, ids in zip(short, self.encode_batch([texts[i] for i in short])):
            out[i] = np.array(ids, dtype=np.uint32)
        for i in (i for i, a in enumerate(out) if a is None):
            parts, n = [], 0
            for piece in _pieces(texts[i]):
                parts.append(np.array(self.encode(piece), dtype=np.uint32))
                n += len(parts[-1])
                if max_tokens and n >= max_tokens:
                    break
            out[i] = np.concatenate(parts)
        return out

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------
    def render_chat(self, messages, add_generation_prompt=False, last_reply_only=False, tools=None):
        """Chat ids and loss mask (lists of ints) of one conversation; see the module docstring.

        last_reply_only: targets only on the final assistant reply (DPO). tools: OpenAI-style schemas offered to the
        model (or carried by the leading system message, see with_tools).
        """
        ids, mask = self.render_chats([with_tools(messages, tools)], add_generation_prompt, last_reply_only)[0]
        return ids.tolist(), mask.tolist()

    def render_chats(self, conversations, add_generation_prompt=False, last_reply_only=False):
        """render_chat() of many conversations (tools carried by their system message), batched; returns
        [(ids int64 array, mask uint8 array)]."""
        layouts = [self._layout(m, add_generation_prompt) for m in conversations]
        # a short conversation without special-token strings in its text is encoded at once (batched, faster)
        whole = [i for i, (_, _, length, clean) in enumerate(layouts) if clean and length <= _PIECE_CHARS]
        texts = ["".join(p[0] for p in layouts[i][0]) for i in whole]
        encoded = dict(zip(whole, self._full.encode_batch(texts, add_special_tokens=False)))
        out = []
        for i, (pieces, replies, _, _) in enumerate(layouts):
            targets = replies[-1:] if last_reply_only else replies
            if i in encoded:
                out.append((np.array(encoded[i].ids, dtype=np.int64), _targets(encoded[i].offsets, 0, targets)))
            else:
                out.append(self._encode_pieces(pieces, targets))
        return out

    def tool_results_ids(self, results):
        """The ids that follow an assistant turn cut after its tool calls (a GRPO rollout stops at </tool_call>), up
        to the next reply: <|im_end|>, the tool turn holding `results` (strings, one per call) and the assistant's
        header; as render_chat() has them there, none a target."""
        pieces = [("<|im_end|>", _SPECIAL, 0), ("\n", _PLAIN, 0)]
        for i, result in enumerate(results):
            pieces += _tool_response_pieces(result, i == 0, i == len(results) - 1)
        return self._encode_pieces(pieces + _GENERATION_PROMPT, [])[0].tolist()

    def holds_special_strings(self, text, reply=False):
        """Whether `text` (message content; reply: of an assistant message) holds special-token strings that
        encode() and render_chat() encode as text (in a reply, REPLY_TAGS are tokens: not counted)."""
        return bool((self._control_re if reply else self._special_re).search(text))

    def conversation_holds_special_strings(self, messages):
        """holds_special_strings() of any text of the conversation: content, reasoning, tool calls, tool schemas."""
        return not self._layout(messages, False)[3]

    def _layout(self, messages, add_generation_prompt):
        """The rendered chat as pieces (text, how, target), how being "special" (a structural token), "plain" or
        "reply" (text of an assistant message), target whether the piece is what an assistant wrote; the character
        ranges of the replies; the text's length; and whether encoding the joined text at once gives the right ids,
        as it does unless some text holds a special-token string."""
        tools = messages[0].get("tools") if messages and messages[0]["role"] == "system" else None
        pieces = _tools_pieces(messages[0].get("content") or "", tools) if tools else []
        for i, m in enumerate(messages):
            if i == 0 and tools:
                continue
            if m["role"] == "tool":
                pieces += _tool_response_pieces(m.get("content") or "", i == 0 or messages[i - 1]["role"] != "tool",
                                                i + 1 == len(messages) or messages[i + 1]["role"] != "tool")
            elif m["role"] == "assistant":
                pieces += _assistant_pieces(m)
            else:
                pieces += [("<|im_start|>", _SPECIAL, 0), (m["role"] + "\n" + (m.get("content") or ""), _PLAIN, 0),
                           ("<|im_end|>", _SPECIAL, 0), ("\n", _PLAIN, 0)]
        if add_generation_prompt:
            pieces += _GENERATION_PROMPT
        replies, pos = [], 0
        for text, _, target in pieces:
            if target and replies and replies[-1][1] == pos:
                replies[-1] = (replies[-1][0], pos + len(text))
            elif target:
                replies.append((pos, pos + len(text)))
            pos += len(text)
        clean = not any(self.holds_special_strings(text, how == _REPLY) for text, how, _ in pieces if how != _SPECIAL)
        return pieces, replies, pos, clean

    def _encode_pieces(self, pieces, targets):
        """Ids and loss mask of the joined pieces, each run of message text encoded on its own (special-token strings
        in it stay text; a long one piece by piece, see encode_arrays), the structural tokens as their ids."""
        ids, mask, pos = [], [], 0
        for how, run in itertools.groupby(pieces, key=lambda p: p[1]):
            for s in [p[0] for p in run] if how == _SPECIAL else ["".join(p[0] for p in run)]:
                if how == _SPECIAL:
                    encoded = [([self._tag_ids[s]], [(0, len(s))], s)]
                else:
                    encoder = self._reply if how == _REPLY else self._plain
                    encoded = ((e.ids, e.offsets, piece) for piece in (_pieces(s) if self._cuttable else [s])
                               for e in [encoder.encode(piece, add_special_tokens=False)])
                for piece_ids, offsets, piece in encoded:
                    ids.append(np.array(piece_ids, dtype=np.int64))
                    mask.append(_targets(offsets, pos, targets))
                    pos += len(piece)
        return np.concatenate(ids), np.concatenate(mask)

    def pieces(self):
        """{token string: id} of every token, the added ones included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def same_ids(self, other):
        """Whether another tokenizer gives every text the ids this one gives: the same vocabulary and merges,
        normalizer, pre-tokenizer and added tokens (a post-processor may differ: training data is encoded without
        it). Then the logits of models trained with either index the same tokens (a distillation teacher's)."""
        def spec(tok):
            spec = json.loads(tok._tok.to_str())
            added = {a["id"]: a["content"] for a in spec["added_tokens"]}
            return [spec.get(k) for k in ("model", "normalizer", "pre_tokenizer")] + [added]

        return spec(self) == spec(other)

    def id_bytes(self):
        """The bytes each id stands for, a list indexed by id: byte-level BPE ids exactly (a piece of a character is
        its bytes), SentencePiece ids with "▁" as a space and <0xNN> as one byte, special tokens their text."""
        spec = json.loads(self._tok.to_str())
        byte_level = _has_type(spec.get("decoder"), "ByteLevel") or _has_type(spec.get("pre_tokenizer"), "ByteLevel")
        byte_of = _byte_level_table()
        out = [b""] * self.vocab_size
        for piece, i in self.pieces().items():
            if byte_level and piece not in self.special_ids and all(c in byte_of for c in piece):
                out[i] = bytes(byte_of[c] for c in piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                out[i] = bytes([int(piece[3:5], 16)])
            else:
                out[i] = piece.replace("\u2581", " ").encode("utf-8")
        return out

    def token_bytes(self):
        """int64 array (3, vocab_size), for bits per byte: the UTF-8 bytes of text each id holds; 1 where an id
        starts with "▁" and the tokenizer (SentencePiece) puts a dummy-prefix "▁" before every text it encodes; 1
        where an id opens a text, whose first "▁" is then that dummy, no byte. A target's bytes are bytes[y] -
        prefix[y] * opens[x], x the token before it (losses.target_bytes).

        The control tokens (<|endoftext|>, <|im_start|>, <|im_end|>) are not text: 0 bytes (their loss still
        counts); they open a text (a document, a message's role). The reasoning tags are the text they spell; the
        chat format puts a newline after <think> and </think> and before </think>: a normaliser that strips
        whitespace (SentencePiece's default) leaves no id for those newlines, so the "▁" after a tag stands for
        the first (the tags open no text then) and </think> counts the one before it. The tool tags are the text
        they spell (with SentencePiece, the "▁" after one stands for the template's newline). Byte-level BPE ids are
        exact bytes (a piece of a character counts its bytes); SentencePiece ids count "▁" as a space and <0xNN>
        as one byte; other whitespace its normaliser removes (runs, the ends of a document) is in no id."""
        spec = json.loads(self._tok.to_str())
        byte_level = _has_type(spec.get("decoder"), "ByteLevel") or _has_type(spec.get("pre_tokenizer"), "ByteLevel")
        byte_chars = set(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters that stand for bytes 0..255
        out = np.zeros((3, self.vocab_size), dtype=np.int64)
        sizes, prefix, opens = out
        dummy = self._plain.encode("a", add_special_tokens=False).tokens[0].startswith("\u2581")
        strips = self.encode("a\n") == self.encode("a")
        specials = {a["content"] for a in spec["added_tokens"] if a["special"]}
        for piece, i in self.pieces().items():
            prefix[i] = dummy and piece.startswith("\u2581")
            if piece in REASONING_TAGS:
                opens[i] = not strips
                sizes[i] = len(piece) + (strips and piece == "</think>")
                continue
            if piece in specials:
                opens[i] = 1
                continue
            if byte_level and all(c in byte_chars for c in piece):
                sizes[i] = len(piece)  # one character per byte
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                sizes[i] = 1
            else:
                sizes[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    # -- files ----------------------------------------------------------------------------------
    def save(self, directory, chat=True):
        """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and special_tokens_map.json, set up so
        that transformers' defaults do what training did: `tokenizer(text)` starts the text as a document (with
        <|endoftext|>, which pretraining put between documents; sample.py's complete mode does the same), the chat
        template adds no such token (prepare.py's chats start at <|im_start|>), and eos is where generation
        stops: <|im_end|> for a chat model, <|endoftext|> for a base model (chat=False)."""
        os.makedirs(directory, exist_ok=True)
        spec = json.loads(self._tok.to_str())
        # the chat template's escapes undone before encoding (see the module docstring), innermost first
        unescape = [{"type": "Replace", "pattern": {"String": t[0] + TEXT_ESCAPE + t[1:]}, "content": t}
                    for t in reversed(self._escaped)]
        own = [spec["normalizer"]] if spec.get("normalizer") else []
        spec["normalizer"] = {"type": "Sequence", "normalizers": unescape + own}
        tok = Tokenizer.from_str(json.dumps(spec))
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B:1", special_tokens=[("<|endoftext|>", self.eot_id)])
        tok.save(os.path.join(directory, "tokenizer.json"))
        special_map = {
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>" if chat else "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "unk_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": self.chat_template,
        }
        write_json(os.path.join(directory, "tokenizer_config.json"), config)
        write_json(os.path.join(directory, "special_tokens_map.json"), special_map)
        with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(self.chat_template)

    def to_str(self):
        """The tokenizer.json text."""
        return self._tok.to_str()


# A layout's pieces (ChatTokenizer._layout): (text, how, target)
_SPECIAL, _PLAIN, _REPLY = "special", "plain", "reply"
_GENERATION_PROMPT = [("<|im_start|>", _SPECIAL, 0), ("assistant\n", _PLAIN, 0)]
_TOOL_TAG = re.compile("(" + "|".join(map(re.escape, TOOL_TAGS)) + ")")


def _tools_pieces(system, tools):
    """The system turn that offers `tools`, after the system message's own content."""
    head = ("system\n" + (system + "\n\n" if system else "") + TOOLS_PREAMBLE
            + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools))
    tail = [(p, _SPECIAL if p in TOOL_TAGS else _PLAIN, 0) for p in _TOOL_TAG.split(TOOLS_POSTAMBLE) if p]
    return [("<|im_start|>", _SPECIAL, 0), (head, _PLAIN, 0), *tail, ("<|im_end|>", _SPECIAL, 0), ("\n", _PLAIN, 0)]


def _assistant_pieces(m):
    """An assistant message: header, think block, content, tool calls, <|im_end|>; all but the header targets."""
    content = m.get("content") or ""
    pieces = [("<|im_start|>", _SPECIAL, 0), ("assistant\n", _REPLY, 0)]
    if m.get("reasoning_content"):
        pieces += [("<think>", _SPECIAL, 1), ("\n" + m["reasoning_content"] + "\n", _REPLY, 1), ("</think>", _SPECIAL, 1),
                   ("\n", _REPLY, 1)]
    pieces.append((content, _REPLY, 1))
    for i, call in enumerate(m.get("tool_calls") or []):
        pieces += [("\n", _REPLY, 1)] if content or i else []
        pieces += [("<tool_call>", _SPECIAL, 1), ("\n" + call_json(call) + "\n", _REPLY, 1), ("</tool_call>", _SPECIAL, 1)]
    return pieces + [("<|im_end|>", _SPECIAL, 1), ("\n", _PLAIN, 0)]


def _tool_response_pieces(content, first, last):
    """A tool message: one <tool_response> block of the user turn that a run of tool messages makes."""
    head = [("<|im_start|>", _SPECIAL, 0), ("user", _PLAIN, 0)] if first else []
    tail = [("<|im_end|>", _SPECIAL, 0), ("\n", _PLAIN, 0)] if last else []
    return head + [("\n", _PLAIN, 0), ("<tool_response>", _SPECIAL, 0), ("\n" + content + "\n", _PLAIN, 0),
                   ("</tool_response>", _SPECIAL, 0)] + tail


def _pieces(text):
    """`text` cut at _CUT into pieces of about _PIECE_CHARS characters (longer where there is no cut)."""
    start = 0
    while len(text) - start > _PIECE_CHARS and (cut := _CUT.search(text, start + _PIECE_CHARS)):
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]


def file_sha256(path):
    """The identity of a saved tokenizer.json: the sha256 of its text without the unescaping steps save() adds, so a
    tokenizer saved before those steps existed (the same vocabulary and ids) keeps its identity."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    spec["normalizer"] = _without_unescape(spec.get("normalizer"))
    return hashlib.sha256(Tokenizer.from_str(json.dumps(spec)).to_str(pretty=True).encode("utf-8")).hexdigest()


def _without_unescape(normalizer):
    """A tokenizer.json normalizer without the unescaping steps save() puts first (None when nothing is left)."""
    if not normalizer or normalizer.get("type") != "Sequence":
        return normalizer
    steps = [n for n in normalizer["normalizers"]
             if not (n.get("type") == "Replace" and TEXT_ESCAPE in n.get("pattern", {}).get("String", ""))]
    return None if not steps else steps[0] if len(steps) == 1 else dict(normalizer, normalizers=steps)


def _has_type(node, kind):
    """Whether a tokenizer.json component (a decoder, a pre-tokenizer, possibly a Sequence of them) is of `kind`."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, kind) for v in node)
    return False


def _byte_level_table():
    """{character: byte} of byte-level BPE, GPT-2's table (tokenizers' ByteLevel.alphabet()): the printable bytes
    stand for themselves, the others for chr(256 + their rank)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _alternation(strings):
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))


def _targets(offsets, start, ranges):
    """The loss mask of tokens whose character offsets (from `start`) are `offsets`: 1 on a token holding any
    character of one of the [lo, hi) `ranges`."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if not offsets:
        return mask
    spans = np.asarray(offsets, dtype=np.int64) + start
    for lo, hi in ranges:
        if lo < spans[-1, 1] and hi > spans[0, 0]:
            mask[(spans[:, 1] > lo) & (spans[:, 0] < hi)] = 1
    return mask


def _from_spec(spec, added_tokens):
    return Tokenizer.from_str(json.dumps(dict(spec, added_tokens=added_tokens)))


# ---------------------------------------------------------------------------------------------
# Making a tokenizer: train one, or load one


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE on an iterable of strings; SPECIAL_TOKENS get ids 0..6, TOOL_TAGS 7..10. Lossless, no
    normaliser."""
    smallest = 256 + len(SPECIAL_TOKENS) + len(TOOL_TAGS) + 1
    if vocab_size < smallest:
        configurator.fail(f"vocab_size={vocab_size} is too small for a byte-level BPE (at least {smallest})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS + TOOL_TAGS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return ChatTokenizer(tok)


def load_tokenizer(path):
    """A ChatTokenizer from a prepared data dir, a run dir, an HF tokenizer dir, a tokenizer.json
    or a SentencePiece .model. Missing SPECIAL_TOKENS and TOOL_TAGS are added (see .added_special_tokens)."""
    path = str(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return ChatTokenizer(_read_tokenizer_json(os.path.join(path, "tokenizer.json")))
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return ChatTokenizer(sentencepiece_to_tokenizers(os.path.join(path, "tokenizer.model")))
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            return ChatTokenizer(_hf_backend(path))
        configurator.fail(f"tokenizer directory '{path}' has no tokenizer.json, tokenizer.model or tokenizer_config.json")
    if not os.path.exists(path):
        configurator.fail(f"tokenizer '{path}' does not exist (give 'train', a tokenizer.json, an HF tokenizer dir, a prepared data dir or a SentencePiece .model)")
    if path.endswith(".model"):
        return ChatTokenizer(sentencepiece_to_tokenizers(path))
    return ChatTokenizer(_read_tokenizer_json(path))


def check_same_vocabulary(what, path, sizes, trained, data_dir):
    """A frozen model that reads or grades the trained model's token ids (a distillation teacher, a reward model)
    must share its vocabulary: as many ids (sizes: the frozen model's and the trained one's), and (data_dir: where the
    data has text, else None) the tokenizer the data was prepared with. what names the frozen model in path (e.g.
    "teacher out/sft"), trained the model trained ("the student"). Else one line naming both."""
    theirs, ours = sizes
    if theirs != ours:
        configurator.fail(f"{what} has a vocabulary of {theirs:,} ids, {trained} {ours:,}: it must share "
                          f"{trained}'s vocabulary")
    if data_dir is None:  # bench.py's random ids: no tokenizer to compare
        return
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                  "tokenizer_config.json")):
        configurator.fail(f"{what} holds no tokenizer to compare with the one {data_dir} was prepared with")
    its, data = load_tokenizer(path), load_tokenizer(data_dir)
    if not its.same_ids(data):
        configurator.fail(f"{what}: its tokenizer ({its.vocab_size:,} tokens) is not the one {data_dir} was prepared "
                          f"with ({data.vocab_size:,} tokens): it must give the text the ids {trained} reads")

def _read_tokenizer_json(path):
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
        configurator.fail(f"cannot read tokenizer '{path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _hf_backend(path):
    """The fast-tokenizer backend of an HF tokenizer directory without tokenizer.json (transformers converts it)."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)  # a local dir; never the Hub
        return Tokenizer.from_str(hf.backend_tokenizer.to_str())
    except Exception as e:
        configurator.fail(f"cannot load the tokenizer in '{path}' with transformers: {str(e).splitlines()[0]}")


# A SentencePiece .model holds a protobuf; these few fields (sentencepiece_model.proto) are all a
# conversion needs, and reading them by hand spares a dependency on the protobuf package.
_SP_TRAINER_SPEC, _SP_NORMALIZER_SPEC = 2, 3
_SP_MODEL_TYPE, _SP_BYTE_FALLBACK = 3, 35  # in TrainerSpec; model_type 1 = unigram, 2 = BPE
_SP_CHARSMAP, _SP_DUMMY_PREFIX, _SP_REMOVE_WHITESPACE = 2, 3, 4  # in NormalizerSpec


def _protobuf_fields(buf):
    """{field number: last value} of one protobuf message (varints and length-delimited bytes)."""
    fields, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            fields[number], i = buf[i : i + n], i + n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return fields


def _varint(buf, i):
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def sentencepiece_to_tokenizers(path):
    """Convert a SentencePiece .model (unigram or BPE) into an equivalent `tokenizers.Tokenizer`."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
        proto = _protobuf_fields(sp.serialized_model_proto())
    except Exception as e:
        configurator.fail(f"cannot read SentencePiece model '{path}': {e}")
    trainer = _protobuf_fields(proto.get(_SP_TRAINER_SPEC, b""))
    norm = _protobuf_fields(proto.get(_SP_NORMALIZER_SPEC, b""))
    byte_fallback = bool(trainer.get(_SP_BYTE_FALLBACK, 0))
    n = sp.get_piece_size()
    # SentencePiece never matches control (<s>, </s>), unknown or unused pieces in text; the
    # tokenizers models would, so they get no merges (BPE) and a prohibitive score (unigram).
    unmatchable = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)}
    scores = [sp.get_score(i) for i in range(n)]
    floor = min(s for i, s in enumerate(scores) if i not in unmatchable) - 1000.0
    pieces = [(sp.id_to_piece(i), floor if i in unmatchable else scores[i]) for i in range(n)]
    if trainer.get(_SP_MODEL_TYPE, 1) == 1:
        model = models.Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=byte_fallback)
    elif trainer.get(_SP_MODEL_TYPE) == 2:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        mergeable = {p: i for p, i in vocab.items() if i not in unmatchable and not sp.is_byte(i)}
        model = models.BPE(vocab, _sentencepiece_merges(mergeable), unk_token=sp.id_to_piece(sp.unk_id()),
                           fuse_unk=True, byte_fallback=byte_fallback)
    else:
        configurator.fail(f"SentencePiece model '{path}' is neither unigram nor BPE")
    tok = Tokenizer(model)
    steps = []
    if norm.get(_SP_CHARSMAP):
        steps.append(normalizers.Precompiled(norm[_SP_CHARSMAP]))
    if norm.get(_SP_REMOVE_WHITESPACE, 1):
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    prepend = "always" if norm.get(_SP_DUMMY_PREFIX, 1) else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend == "always":
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    controls = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    return tok


def _sentencepiece_merges(vocab):
    """BPE merges implied by a SentencePiece BPE vocab: a piece is made from two pieces, ranked by id."""
    merges = []
    for piece, rank in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]
