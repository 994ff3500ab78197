"""
Input records -> one internal form, for prepare.py.

Every line of an input file is detected on its own: plain text, a chat in any
of the usual shapes (role/content, OpenAI messages, ShareGPT from/value,
Alpaca, OpenAI/TRL prompt-completion), a preference pair (with an optional
margin, as TRL's reward trainer reads it), or a task (a prompt with its
reference answer, for grpo; or, where asked, a prompt alone). A record that cannot be used raises BadRecord with a short reason,
which prepare.py counts.

Tool conversations come in three shapes, all made OpenAI's: OpenAI chat completions (a record's `tools`, assistant
`tool_calls` whose function.arguments is JSON text or an object, `role: "tool"` messages, the older
`function_call` / `role: "function"` too); ShareGPT's function calling (LLaMA-Factory's glaive/xLAM sets: a
`tools` JSON string, `function_call` turns holding a call or a list of them, `observation` turns holding results);
and MiniMind's (the tools, a JSON string, on the system message; `tool_calls` a JSON string of {"name",
"arguments"}). The tools end up on the leading system message (tokenizer.with_tools), each as {"type":
"function", "function": schema}; a call keeps its arguments as given (JSON text verbatim, which is what the chat
template renders). A call without a name or whose arguments are not a JSON object, a tool message that answers no
call of the assistant message before it, or tools that are not function schemas: a bad record.
"""

import json
import math
import re

from llm_trainer.data.tokenizer import with_tools


class BadRecord(Exception):
    """A record that cannot be used; `reason` is a short machine-readable word for the summary."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


_ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant",
    "function_call": "assistant",  # ShareGPT: an assistant turn that is a call (or a list of them)
    "system": "system",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",  # a tool's result
}


def detect_record(obj, prompts=False):
    """(kind, payload, format) of one input record: ("text", str), ("chat", messages),
    ("pair", (chosen_messages, rejected_messages)) or ("task", (prompt_messages, reference answer)), and the
    name of the input format it was recognised as; raises BadRecord. prompts: a record that holds a prompt and no
    reply ({"prompt"} alone, a chat whose last message is the user's and that has no reply) is ("prompt",
    messages), not a bad record."""
    if prompts and _prompt_only(obj):
        return "prompt", _prompt_messages(obj), "prompt" if isinstance(obj, dict) and "prompt" in obj else "messages"
    if isinstance(obj, list):
        return "chat", _conversation(obj), "message_list"
    if not isinstance(obj, dict):
        raise BadRecord("unknown_shape")
    if "chosen" in obj and "rejected" in obj:
        return "pair", _pair(obj), "pair"
    if "prompt" in obj and "answer" in obj:
        return "task", _task(obj), "task"
    if "prompt" in obj and "completion" in obj:  # OpenAI / TRL prompt-completion: a chat, not the completion's text
        messages = _as_messages(obj["prompt"], "user") + _as_messages(obj["completion"], "assistant")
        messages = _with_record_tools(obj, messages)
        return "chat", _checked(messages), "prompt_completion" + ("_tools" if _uses_tools(messages) else "")
    for key in ("conversations", "messages"):
        if key in obj:
            messages = _with_record_tools(obj, _system_field(obj) + _messages(obj[key]))
            sharegpt = obj[key] and isinstance(obj[key][0], dict) and obj[key][0].get("from") is not None
            fmt = ("sharegpt" if sharegpt else key) + ("_tools" if _uses_tools(messages) else "")
            return "chat", _checked(messages), fmt
    if "instruction" in obj and "output" in obj:
        return "chat", _alpaca(obj), "alpaca"
    for key in ("text", "content", "completion"):
        if key in obj:
            return "text", _text(obj[key]), key
    raise BadRecord("unknown_shape")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value, allow_empty=False):
    if not isinstance(value, str):
        raise BadRecord("non_string_content")
    if _SURROGATE.search(value):  # a JSON escape such as "\ud800" alone: not encodable text
        raise BadRecord("lone_surrogate")
    if not allow_empty and not value.strip():
        raise BadRecord("empty_content")
    return value


def _message(m):
    if (not isinstance(m, dict) or ("role" not in m and "from" not in m)
            or ("content" not in m and "value" not in m and not _CALL_KEYS & set(m))):
        raise BadRecord("bad_message")
    # role/content (OpenAI) or from/value (ShareGPT); a null one is absent (Parquet rows carry both)
    given = m.get("role") if m.get("role") is not None else m.get("from")
    content = m.get("content") if m.get("content") is not None else m.get("value")
    role = _ROLES.get(given.lower()) if isinstance(given, str) else None
    if role is None:
        raise BadRecord("unknown_role")
    if given.lower() == "function_call":  # ShareGPT: the turn's text is the call
        return {"role": "assistant", "content": "", "tool_calls": _calls(_json(content, "bad_tool_call"))}
    calls = _calls(m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else []))
    if calls and content is None:  # OpenAI: no text beside the calls
        content = ""
    out = {"role": role, "content": _text(content, allow_empty=role in ("system", "tool") or bool(calls))}
    reasoning = m.get("reasoning_content")
    if role == "assistant" and reasoning is not None and _text(reasoning, allow_empty=True).strip():
        out["reasoning_content"] = reasoning
    if role == "assistant" and calls:
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name") if role == "tool" else ("tools",) if role == "system" else ():
        if m.get(key) is not None:
            out[key] = _tools(m[key]) if key == "tools" else _text(m[key])
    return out


_CALL_KEYS = {"tool_calls", "function_call"}


def _json(value, reason):
    """A JSON text parsed (anything else as it is); not JSON: BadRecord(reason)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise BadRecord(reason) from None


def _calls(value):
    """Tool calls (a list, one call, or the JSON text of either) as OpenAI's {"type": "function", "function":
    {"name", "arguments"}} (with the call's "id" when it has one); arguments kept as given, after checking that they
    are a JSON object."""
    value = _json(value, "bad_tool_call")
    out = []
    for c in value if isinstance(value, list) else [value]:
        f = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"].strip():
            raise BadRecord("bad_tool_call")
        args = f.get("arguments", {})
        if not isinstance(_json(args, "bad_tool_arguments"), dict):
            raise BadRecord("bad_tool_arguments")
        call = {"type": "function", "function": {"name": f["name"], "arguments": args}}
        out.append({"id": c["id"], **call} if isinstance(c.get("id"), str) else call)
    return out


def _tools(value):
    """Tool schemas (a list or its JSON text) as OpenAI's {"type": "function", "function": schema}; a bare schema
    (glaive, xLAM) is wrapped."""
    value = _json(value, "bad_tools")
    if value is None or value == "":
        return []
    if not isinstance(value, list):
        raise BadRecord("bad_tools")
    out = []
    for t in value:
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict):
            t, schema = t, t["function"]
        else:
            t, schema = {"type": "function", "function": t}, t
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str) or not schema["name"].strip():
            raise BadRecord("bad_tools")
        out.append(t)
    return out


def _with_record_tools(obj, messages):
    """The conversation with the record's tools (a top-level "tools", or "tools" on system messages, MiniMind's) on
    its leading system message, its tool messages checked against the calls they answer."""
    tools = _tools(obj.get("tools")) + [t for m in messages for t in m.get("tools", [])]
    messages = [{k: v for k, v in m.items() if k != "tools"} for m in messages]
    _check_tool_turns(messages)
    return with_tools(messages, tools)


def _check_tool_turns(messages):
    """Each tool message answers a call of the assistant message before the run of tool messages it is in: the one
    its tool_call_id names, else the first one not yet answered."""
    pending = []
    for m in messages:
        if m["role"] == "assistant":
            pending = list(m.get("tool_calls", []))
        elif m["role"] == "tool":
            named = [c for c in pending if m.get("tool_call_id") is not None and c.get("id") == m["tool_call_id"]]
            if not pending or (m.get("tool_call_id") is not None and any("id" in c for c in pending) and not named):
                raise BadRecord("tool_answers_no_call")
            pending.remove((named or pending)[0])
        else:
            pending = []


def _uses_tools(messages):
    return any(m.get("tools") or m.get("tool_calls") for m in messages)


def _messages(value):
    """Messages of a list, with empty system messages dropped; not yet checked for a reply."""
    if not isinstance(value, list):
        raise BadRecord("unknown_shape")
    messages = [_message(m) for m in value]
    return [m for m in messages if m["role"] != "system" or m["content"].strip() or m.get("tools")]


def _as_messages(value, role):
    """A string as one message from `role`, or a list of messages."""
    return [{"role": role, "content": _text(value)}] if isinstance(value, str) else _messages(value)


def _checked(messages):
    if not messages:
        raise BadRecord("empty_conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant")
    return messages


def _conversation(value):
    if not value:
        raise BadRecord("empty_conversation")
    return _checked(_messages(value))


def _system_field(obj):
    """A top-level "system" string (Alpaca, some ShareGPT dumps) as a leading system message."""
    system = obj.get("system")
    if system is None:
        return []
    return [{"role": "system", "content": _text(system, allow_empty=True)}] if _text(system, allow_empty=True).strip() else []


def _alpaca(obj):
    instruction, extra = _text(obj["instruction"], allow_empty=True), _text(obj.get("input") or "", allow_empty=True)
    prompt = "\n".join(s for s in (instruction, extra) if s)
    messages = _system_field(obj)
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise BadRecord("bad_message")
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise BadRecord("bad_message")
        messages += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
    messages += [{"role": "user", "content": _text(prompt)}, {"role": "assistant", "content": _text(obj["output"])}]
    return messages


def _task(obj):
    """(prompt messages, reference answer) of {"prompt": str or messages, "answer": str}."""
    messages = _with_record_tools(obj, _as_messages(obj["prompt"], "user"))
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord("no_prompt")
    return messages, _text(obj["answer"])


def _prompt_only(obj):
    """Whether a record is a prompt with no reply: {"prompt"} without an answer, completion or pair, or a chat
    without any assistant message."""
    if isinstance(obj, dict) and "prompt" in obj:
        return not {"answer", "completion", "chosen", "rejected"} & obj.keys()
    messages = obj if isinstance(obj, list) else next((obj[k] for k in ("conversations", "messages")
                                                       if isinstance(obj, dict) and k in obj), None)
    return isinstance(messages, list) and not any(
        isinstance(m, dict) and _ROLES.get(str(m.get("role", m.get("from"))).lower()) == "assistant" for m in messages)


def _prompt_messages(obj):
    if isinstance(obj, dict) and "prompt" in obj:
        messages = _system_field(obj) + _as_messages(obj["prompt"], "user")
    else:
        messages = _messages(obj) if isinstance(obj, list) else _system_field(obj) + _messages(
            obj.get("conversations", obj.get("messages")))
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord("no_prompt")
    return messages


def as_prompt(messages):
    """A prompt alone as a task for grpo: no reference answer (a reward that needs none scores it)."""
    return messages, None


def as_task(messages):
    """A chat as a task for grpo: the messages before its last assistant reply, and that reply as the
    reference answer (its reasoning, if any, is not part of the answer); a chat whose last message is the user's
    is a prompt without a reference answer."""
    if messages[-1]["role"] == "user":
        return as_prompt(messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if not any(m["role"] == "user" for m in messages[:last]):
        raise BadRecord("no_prompt")
    return messages[:last], messages[last]["content"]


def _pair(obj):
    """(chosen, rejected) message lists that share every message but the final assistant reply."""
    prompt = obj.get("prompt")
    if prompt is None:
        prompt = obj.get("conversations", obj.get("messages", []))
    prompt = _as_messages(prompt, "user")
    if not prompt and (isinstance(obj["chosen"], str) or isinstance(obj["rejected"], str)):
        raise BadRecord("unknown_shape")
    chosen, rejected = (_with_record_tools(obj, _answer(obj[side], prompt)) for side in ("chosen", "rejected"))
    for side in (chosen, rejected):
        if not side or side[-1]["role"] != "assistant":
            raise BadRecord("no_assistant")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("pair_prompt_mismatch")
    return chosen, rejected


def pair_margin(obj):
    """The margin a preference record gives, by how much the chosen reply should score above the rejected one (a
    reward model's Bradley-Terry loss subtracts it, as TRL's), or None when it gives none."""
    margin = obj.get("margin") if isinstance(obj, dict) else None
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise BadRecord("bad_margin")
    return margin


def _answer(value, prompt):
    if isinstance(value, str):
        return prompt + [{"role": "assistant", "content": _text(value)}]
    if isinstance(value, dict):
        return prompt + [_message(value)]
    messages = _messages(value)
    return messages if messages[: len(prompt)] == prompt else prompt + messages
