"""
An OpenAI-compatible HTTP server and a chat page for a run directory or an HF directory (FastAPI + uvicorn).

    python serve.py --out_dir=out/demo/sft            # http://127.0.0.1:8000, the chat page at /
    python serve.py --hf_dir=hf/sft --host=0.0.0.0 --port=8080 --api_key=...

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Who are you?"}])

Endpoints: POST /v1/chat/completions (messages, stream, temperature, top_p, frequency_penalty, presence_penalty,
max_tokens, stop, seed, n, logprobs, top_logprobs, and vLLM's repetition_penalty; tools, tool_choice,
parallel_tool_calls, tool messages and assistant tool_calls, a reply's calls coming back as tool_calls; a
reasoning model's <think> block comes back as reasoning_content, as DeepSeek's API returns it, streamed too), POST
/v1/completions (a prompt continued, for base models: the text as written, no <think> split), GET /v1/models, GET
/health (the queue and the generation counters), GET / (the chat page, serve.html: one file, no build step, nothing
from a CDN), POST /fit_history (the page's conversation trimmed as sample.py trims it), GET /tools and POST
/tools/run (the page's tools, --tools, and one call of them run here).

Every value of a request is checked before anything is queued; max_tokens is clamped to what the context leaves.
Generations are queued: one worker thread runs one request at a time on the model, with the code sample.py uses
(generation.ReplyStream), so requests never share state. Guard, plain ASGI in front of the app, checks the API key
and counts the body's bytes as they arrive; a client that disconnects, streamed or not, stops its generation
before the next token, which frees the worker for the next. Every error is OpenAI's error JSON; the server keeps
serving.
"""

import asyncio
import json
import os
import queue
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

import configurator
from llm_trainer.inference import generation
from llm_trainer.inference.tools import Tools
from llm_trainer.core.common import dtype_name, resolve_device, resolve_dtype

# -----------------------------------------------------------------------------
out_dir = ""  # a run directory (ckpt.pt + tokenizer files) ...
hf_dir = ""  # ... or an HF transformers directory
host = "127.0.0.1"  # 0.0.0.0 to listen on every interface
port = 8000
api_key = ""  # when set, requests must send "Authorization: Bearer <api_key>"
model_name = ""  # the model's id in the API ("": the directory's name)
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16
max_tokens = 512  # a reply's tokens at most: a request asking more (or nothing) gets this, or what the context leaves
max_n = 4  # completions per request at most
max_request_bytes = 1_000_000  # a larger request body is refused (413)
queue_size = 64  # requests waiting for the model at most; more are refused (429)
tools = ""  # the chat page's tools, run here: calculator, a .py file of functions, or several (as sample.py's)
max_tool_steps = 4  # the chat page: replies whose tool calls are run, at most, before the answer
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for a function's name
DRAIN_SECONDS = 10  # how long an oversized body is read on (and dropped) so that its sender hears the 413


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -----------------------------------------------------------------------------
# generation: one worker thread, requests in turn


@dataclass
class Params:
    """A request's generation settings, every one checked before anything is queued."""

    sampling: dict  # temperature, top_p, frequency_penalty, presence_penalty, repetition_penalty
    max_new_tokens: int
    stop: list
    seed: Optional[int]
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: Optional[int]  # None: no logprobs
    parallel_tool_calls: bool  # False: a reply ends after its first tool call


class Job:
    """One request's generations: run on the worker thread, their events handed to the request's event loop."""

    def __init__(self, loop, prompt_ids, stop_ids, params, reply):
        self.loop, self.events, self.cancelled, self.cancelled_at = loop, asyncio.Queue(), threading.Event(), None
        self.prompt_ids, self.stop_ids, self.params, self.reply = prompt_ids, stop_ids, params, reply

    def emit(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self):
        """Its client is gone (or has all it asked for): the generation stops before its next token."""
        if not self.cancelled.is_set():
            self.cancelled_at = time.monotonic()
            self.cancelled.set()

    def run(self, engine):
        """("delta", choice, reasoning, content, logprobs, calls) as text streams, ("finish", choice, reason, tokens)
        per choice (reason "tool_calls" for a reply that stopped after calling tools); the tokens generated. reply:
        ReplyStream's split, tools and prefix."""
        p = self.params
        gen = torch.Generator(engine.device).manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        total = 0
        for choice in range(p.n):
            stream = generation.ReplyStream(engine.model, engine.tokenizer, self.prompt_ids, self.stop_ids,
                                            p.max_new_tokens, stop=p.stop, max_len=engine.context,
                                            cancelled=self.cancelled.is_set, generator=gen,
                                            top_logprobs=p.top_logprobs, **self.reply, **p.sampling)
            called = False
            for piece in stream:
                calls = piece.calls if p.parallel_tool_calls else piece.calls[:1]  # a piece may complete two
                if piece.reasoning or piece.content or piece.logprobs or calls:
                    self.emit("delta", choice, piece.reasoning, piece.content, piece.logprobs, calls)
                called = called or bool(calls)
                if called and not p.parallel_tool_calls:
                    break  # the reply ends with its first call
            total += stream.tokens
            called = called and (stream.finish_reason == "stop" or not p.parallel_tool_calls)
            self.emit("finish", choice, "tool_calls" if called else stream.finish_reason, stream.tokens)
            if self.cancelled.is_set():
                break
        return total


class Engine:
    """The model and its tokenizer, and the one thread that generates with them, a request at a time.

    counts (GET /health): requests accepted for generation, generations run, tokens generated, requests
    skipped (their client left while they waited), generations cancelled (their client left mid-way) and the
    most milliseconds one of those went on after its client had gone."""

    def __init__(self, path, device_name, dtype_name_, queue_size):
        self.device = resolve_device(device_name)
        self.model, self.tokenizer, self.info = generation.load(path, self.device,
                                                                dtype_name(resolve_dtype(dtype_name_, self.device)))
        self.context = self.info["block_size"]
        self.id_bytes = self.tokenizer.id_bytes()
        self.jobs = queue.Queue(maxsize=queue_size)
        self.busy = False
        self.counts = {"accepted": 0, "run": 0, "tokens": 0, "skipped": 0, "cancelled": 0, "max_cancel_lag_ms": 0.0}
        threading.Thread(target=self._work, name="generation", daemon=True).start()

    def submit(self, job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "too many requests are waiting for the model; try again later",
                           kind="rate_limit_error") from None
        self.counts["accepted"] += 1

    def _work(self):
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():  # its client left while it waited
                self.counts["skipped"] += 1
                job.emit("done")
                continue
            self.busy = True
            try:
                with torch.inference_mode():
                    self.counts["tokens"] += job.run(self)
            except Exception as e:  # noqa: BLE001 -- the request fails, the server does not
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            self.counts["run"] += 1
            if job.cancelled.is_set():  # only its client leaving cancels a job before "done"
                self.counts["cancelled"] += 1
                lag = 1000 * (time.monotonic() - job.cancelled_at)
                self.counts["max_cancel_lag_ms"] = max(self.counts["max_cancel_lag_ms"], round(lag, 1))
            self.busy = False
            job.emit("done")


# -----------------------------------------------------------------------------
# requests


def field(body, name, kinds, default=None, check=None, why=""):
    """body[name] if of one of `kinds` (bool is not a number) and check(value) holds; default when absent."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    numeric = float in kinds or int in kinds
    if not isinstance(value, kinds) or (numeric and isinstance(value, bool)) or (check and not check(value)):
        raise APIError(400, f"'{name}' {why or 'has the wrong type'}: got {value!r}"[:300], param=name)
    return value


def request_params(body, cfg, prompt_len, context, top_logprobs):
    """A request's Params, each value checked; max_tokens is clamped to --max_tokens and to the room the context
    leaves after the prompt (finish_reason "length" then says it was cut)."""
    temperature = field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be a number in [0, 2]")
    top_p = field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be a number in (0, 1]")
    penalties = {name: float(field(body, name, (int, float), 0.0, lambda v: -2 <= v <= 2, "must be a number in "
                                   "[-2, 2]")) for name in ("frequency_penalty", "presence_penalty")}
    penalties["repetition_penalty"] = float(field(body, "repetition_penalty", (int, float), 1.0,
                                                  lambda v: 0 < v <= 10, "must be a number in (0, 10]"))
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens; the model's context is {context}", param="messages",
                       code="context_length_exceeded")
    wanted = field(body, "max_tokens", int, None, lambda v: v >= 1, "must be a positive integer")
    wanted = field(body, "max_completion_tokens", int, wanted, lambda v: v >= 1, "must be a positive integer")
    stop = field(body, "stop", (str, list), [], lambda v: v != "" if isinstance(v, str) else (
        len(v) <= 4 and all(isinstance(s, str) and s for s in v)), "must be a non-empty string or a list of up to 4")
    seed = field(body, "seed", int, None, lambda v: -2**63 <= v < 2**64, "must be an integer in [-2**63, 2**64)")
    n = field(body, "n", int, 1, lambda v: 1 <= v <= cfg["max_n"], f"must be an integer in [1, {cfg['max_n']}]")
    stream = field(body, "stream", bool, False)
    include_usage = field(field(body, "stream_options", dict, {}), "include_usage", bool, False)
    parallel_tool_calls = field(body, "parallel_tool_calls", bool, True)
    return Params({"temperature": float(temperature), "top_p": float(top_p), **penalties},
                  min(wanted or cfg["max_tokens"], cfg["max_tokens"], room), [stop] if isinstance(stop, str) else stop,
                  seed, n, stream, include_usage, top_logprobs, parallel_tool_calls)


def chat_top_logprobs(body):
    """Chat's logprobs (true/false) and top_logprobs (0..20) as ReplyStream's top_logprobs: None when off."""
    wanted = field(body, "logprobs", bool, False)
    top = field(body, "top_logprobs", int, None, lambda v: 0 <= v <= 20, "must be an integer in [0, 20]")
    if top is not None and not wanted:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def completion_top_logprobs(body):
    """The completions API's logprobs: the number of alternatives (0..5) per token, None when off."""
    return field(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "must be an integer in [0, 5]")


def text_content(content, where):
    """A message's content as a string: OpenAI's content parts joined (text ones only); None stays None."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"{where}.content: only text parts {{'type': 'text', 'text': a string}} are supported",
                           param=where)
        return "".join(p["text"] for p in content)
    return content


def sent_tool_calls(m, where):
    """An assistant message's tool_calls, OpenAI's [{id, type: "function", function: {name, arguments: the JSON
    text}}] (the chat template renders the arguments as written), and their ids."""
    calls = m.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise APIError(400, f"{where}.tool_calls must be a non-empty list", param=f"{where}.tool_calls")
    out, ids = [], []
    for j, call in enumerate(calls):
        f = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(f, dict) and call.get("type", "function") == "function" and isinstance(call.get("id"), str)
                and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)):
            raise APIError(400, f"{where}.tool_calls[{j}] must be {{'id': a string, 'type': 'function', 'function': "
                                f"{{'name': a string, 'arguments': a JSON string}}}}", param=f"{where}.tool_calls[{j}]")
        out.append({"id": call["id"], "type": "function", "function": {"name": f["name"], "arguments": f["arguments"]}})
        ids.append(call["id"])
    return out, ids


def chat_messages(body):
    """The conversation as the chat template takes it: [{role, content}], a developer message (newer clients' system)
    as a system one, an assistant's tool_calls kept (its content may then be null: ""), a tool message's
    tool_call_id too (so that the result is a request's messages again: /fit_history). As OpenAI's API requires,
    each tool message answers a call of the assistant message before it and every call is answered before the
    conversation goes on."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    out, unanswered = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        content = text_content(m.get("content"), where) if isinstance(m, dict) else None
        role = m.get("role") if isinstance(m, dict) else None
        calls = role == "assistant" and m.get("tool_calls") is not None
        if role not in ROLES or not (isinstance(content, str) or (calls and content is None)):
            raise APIError(400, f"{where} must be {{'role': system|developer|user|assistant|tool, 'content': a "
                                f"string}}", param=where)
        if unanswered and role != "tool":
            raise APIError(400, f"{where}: the tool calls {', '.join(unanswered)} have no tool message answering them",
                           param=where)
        message = {"role": "system" if role == "developer" else role, "content": content or ""}
        if calls:
            message["tool_calls"], unanswered = sent_tool_calls(m, where)
        if role == "tool":
            if m.get("tool_call_id") not in unanswered:
                raise APIError(400, f"{where}: a tool message must answer a call of the assistant message before it "
                                    f"('tool_call_id' one of {unanswered}, got {m.get('tool_call_id')!r})"[:300],
                               param=f"{where}.tool_call_id")
            unanswered.remove(m["tool_call_id"])
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message must be the user's, a tool's (or the system's)", param="messages")
    return out


def tool_parameters(schema, where):
    """A function's parameters: OpenAI's API takes a JSON Schema of type "object" (checked this far: properties
    are schemas, required names some of them)."""
    props = schema.get("properties", {}) if isinstance(schema, dict) else None
    required = schema.get("required", []) if isinstance(schema, dict) else None
    if (schema.get("type", "object") if isinstance(schema, dict) else None) != "object" or not isinstance(props, dict) \
            or not all(isinstance(v, dict) for v in props.values()) or not isinstance(required, list) \
            or not all(isinstance(r, str) and r in props for r in required):
        raise APIError(400, f"{where} must be a JSON Schema of type 'object' (its properties schemas, 'required' "
                            f"some of their names): got {schema!r}"[:300], param=where)


def chat_tools(body):
    """(tools, choice) of a request: the functions offered, OpenAI's [{"type": "function", "function": {name,
    description, parameters, strict}}] as given ([] when none), and tool_choice: "auto" (the default with tools),
    "none" (the default without), "required", or the name of the function the reply must call ({"type": "function",
    "function": {"name": ...}})."""
    tools = field(body, "tools", list, [])
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise APIError(400, f"{where} must be {{'type': 'function', 'function': {{'name', 'description', "
                                f"'parameters'}}}}", param=where)
        f = tool.get("function")
        if not isinstance(f, dict):
            raise APIError(400, f"{where}.function must be an object {{'name', 'description', 'parameters'}}",
                           param=f"{where}.function")
        name = f.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name in names:
            raise APIError(400, f"{where}.function.name must be a new name of 1 to 64 letters, digits, '_' or '-': "
                                f"got {name!r}"[:300], param=f"{where}.function.name")
        names.add(name)
        for key, kind in (("description", str), ("strict", bool)):
            if f.get(key) is not None and not isinstance(f[key], kind):
                raise APIError(400, f"{where}.function.{key} must be a {kind.__name__}: got {f[key]!r}"[:300],
                               param=f"{where}.function.{key}")
        if "parameters" in f:
            tool_parameters(f["parameters"], f"{where}.function.parameters")
    choice = body.get("tool_choice")
    choice = ("auto" if tools else "none") if choice is None else choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if not isinstance(choice, str) or choice not in names:
            raise APIError(400, f"'tool_choice' names a function that is not in 'tools': {choice!r}"[:300],
                           param="tool_choice")
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                            f"{{'name': ...}}}}: got {choice!r}"[:300], param="tool_choice")
    elif choice == "required" and not tools:
        raise APIError(400, "'tool_choice' 'required' needs 'tools'", param="tool_choice")
    return tools, choice


def completion_prompt(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
    for name, unsupported in (("echo", field(body, "echo", bool, False)), ("suffix", field(body, "suffix", str, "")),
                              ("best_of", field(body, "best_of", int, 1) != 1)):
        if unsupported:
            raise APIError(400, f"'{name}' is not supported", param=name)
    return prompt


# -----------------------------------------------------------------------------
# the guard in front of the app: the API key and the body's size


async def send_error(send, e):
    raw = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


async def read_body(receive, cap):
    """(body, size) of a request as it arrives: body is None past cap bytes (the rest is read and dropped, for at
    most DRAIN_SECONDS, so that the client still sending hears the answer), or when the client left (size -1)."""
    chunks, size, deadline = [], 0, None
    while True:
        try:
            message = await asyncio.wait_for(receive(), None if deadline is None else deadline - time.monotonic())
        except asyncio.TimeoutError:
            return None, size
        if message["type"] == "http.disconnect":
            return None, -1
        size += len(message.get("body", b""))
        if size <= cap:
            chunks.append(message.get("body", b""))
        elif deadline is None:
            chunks, deadline = None, time.monotonic() + DRAIN_SECONDS
        if not message.get("more_body"):
            return (b"".join(chunks) if chunks is not None else None), size


class Guard:
    """Plain ASGI in front of the app (not BaseHTTPMiddleware, which hides disconnects from the app): the API key,
    and the body, read here and counted as it arrives (a chunked body has no Content-Length to trust), kept up to
    max_request_bytes and handed to the app whole; past that it is dropped as it comes, so memory stays flat, and the
    413 follows. The app then reads the server's own receive(), whose http.disconnect says the client has left."""

    def __init__(self, app, cfg):
        self.app, self.cfg = app, cfg

    def refusal(self, scope, headers):
        cap = self.cfg["max_request_bytes"]
        if self.cfg["api_key"] and (scope["method"] == "POST" or scope["path"].startswith("/v1/")):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.cfg['api_key']}".encode()):
                return APIError(401, "invalid API key: send 'Authorization: Bearer <key>'", kind="authentication_error",
                                code="invalid_api_key")
        size = headers.get(b"content-length", b"0")
        if not size.isdigit() or int(size) > cap:
            return APIError(413, f"the request is larger than {cap} bytes")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self.refusal(scope, headers)
        if refusal and headers.get(b"expect", b"").lower() == b"100-continue":
            return await send_error(send, refusal)  # the client waits for this answer before sending the body
        body, size = await read_body(receive, self.cfg["max_request_bytes"])
        if size < 0:
            return  # the client left
        if refusal is None and body is None:
            refusal = APIError(413, f"the request is larger than {self.cfg['max_request_bytes']} bytes")
        if refusal:
            return await send_error(send, refusal)
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()
        await self.app(scope, replay, send)


async def cancel_when_gone(receive, job):
    """Cancel the job when its client disconnects: once the body is read, receive() answers only that."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


# -----------------------------------------------------------------------------
# the app


def create_app(engine, cfg, page_tools=None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llm-trainer serve", docs_url=None, redoc_url=None)
    name = cfg["model_name"] or os.path.basename(os.path.normpath(cfg["out_dir"] or cfg["hf_dir"]))
    tok = engine.tokenizer

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(APIError(400, str(e)[:300]).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug: still OpenAI's error JSON, and the server keeps serving
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}"[:300], kind="server_error").body(),
                            status_code=500)

    async def read_json(request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep to read
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def start(prompt_ids, stop_ids, params, **reply):
        job = Job(asyncio.get_running_loop(), prompt_ids, stop_ids, params, reply)
        engine.submit(job)
        return job

    async def collect(request, job):
        """Every choice's [reasoning, content, finish reason, tokens, logprobs, tool calls], waiting for the worker; a
        client that leaves cancels its generation."""
        choices = [["", "", None, 0, [], []] for _ in range(job.params.n)]
        watcher = asyncio.ensure_future(cancel_when_gone(request.receive, job))
        try:
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    c = choices[event[1]]
                    c[0], c[1], c[4], c[5] = c[0] + event[2], c[1] + event[3], c[4] + event[4], c[5] + event[5]
                elif event[0] == "finish":
                    choices[event[1]][2:4] = event[2:]
                elif event[0] == "error":
                    raise APIError(500, event[1], kind="server_error")
                else:
                    return choices
        finally:
            watcher.cancel()

    def usage(prompt_ids, tokens):
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": tokens, "total_tokens": len(prompt_ids) + tokens}

    def token_text(i):
        return tok.decode([i])

    def chat_logprobs(entries, asked):
        """OpenAI's chat logprobs of TokenLogprobs: a token's text, log-probability, bytes and top alternatives."""
        if asked is None:
            return None
        def one(i, logprob):
            return {"token": token_text(i), "logprob": logprob, "bytes": list(engine.id_bytes[i])}
        return {"content": [{**one(e.id, e.logprob), "top_logprobs": [one(*t) for t in e.top]} for e in entries],
                "refusal": None}

    def completion_logprobs(entries, asked):
        """The completions API's logprobs: tokens, their log-probabilities, the top ones by text, text offsets."""
        if asked is None:
            return None
        return {"tokens": [token_text(e.id) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_text(i): lp for i, lp in e.top} for e in entries],
                "text_offset": [e.offset for e in entries]}

    def stream(job, prompt_ids, chunk_of):
        """The server-sent events of a streamed response, OpenAI's chunk format; a chunk's logprobs are those of
        the tokens since the last chunk. A tool call comes whole once its text is (two chunks, as OpenAI's API
        sends them: its index, id, type and name, then its arguments). When the client goes, its generation is
        cancelled."""
        async def events():
            tokens, held, called = 0, [[] for _ in range(job.params.n)], [0] * job.params.n
            try:
                for choice in range(job.params.n):
                    yield sse(chunk_of(choice, "", "", None, None, role=True))
                while True:
                    event = await job.events.get()
                    if event[0] == "delta":
                        choice = event[1]
                        held[choice] += event[4]
                        if event[2] or event[3]:
                            yield sse(chunk_of(choice, event[2], event[3], held[choice], None))
                            held[choice] = []
                        for call in event[5]:
                            for part in call_deltas(called[choice], call):
                                yield sse(chunk_of(choice, "", "", held[choice], None, tool_calls=[part]))
                                held[choice] = []
                            called[choice] += 1
                    elif event[0] == "finish":
                        tokens += event[3]
                        yield sse(chunk_of(event[1], "", "", held[event[1]], event[2]))
                    elif event[0] == "error":
                        yield sse(APIError(500, event[1], kind="server_error").body())
                        break
                    else:
                        if job.params.include_usage:
                            yield sse({**chunk_of(0, "", "", None, None), "choices": [],
                                       "usage": usage(prompt_ids, tokens)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        tools, choice = chat_tools(body)
        offered = tools if choice != "none" else None
        prefix, forced = generation.call_start(tok, None if choice == "required" else choice) \
            if choice not in ("auto", "none") else ("", [])
        prompt_ids = generation.chat_prompt_ids(tok, chat_messages(body), offered) + forced
        params = request_params(body, cfg, len(prompt_ids), engine.context, chat_top_logprobs(body))
        job = start(prompt_ids, generation.chat_stop_ids(tok), params, split=True, tools=bool(offered), prefix=prefix)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": name}
        if params.stream:
            def chunk_of(choice, reasoning, content, logprobs, finish, role=False, tool_calls=None):
                delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content),
                                           ("tool_calls", tool_calls)) if v}
                return {**head, "object": "chat.completion.chunk", "choices": [{
                    "index": choice, "delta": {"role": "assistant", "content": ""} if role else delta,
                    "logprobs": chat_logprobs(logprobs or [], params.top_logprobs), "finish_reason": finish}]}
            return stream(job, prompt_ids, chunk_of)
        choices = await collect(request, job)
        return {**head, "object": "chat.completion", "usage": usage(prompt_ids, sum(c[3] for c in choices)),
                "choices": [{"index": i, "finish_reason": c[2], "logprobs": chat_logprobs(c[4], params.top_logprobs),
                             "message": {"role": "assistant", "content": c[1] if c[1] or not c[5] else None,
                                         **({"reasoning_content": c[0]} if c[0] else {}),
                                         **({"tool_calls": [api_call(call) for call in c[5]]} if c[5] else {})}}
                            for i, c in enumerate(choices)]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt_ids = generation.complete_prompt_ids(tok, completion_prompt(body))
        params = request_params(body, cfg, len(prompt_ids), engine.context, completion_top_logprobs(body))
        job = start(prompt_ids, (tok.eot_id,), params, split=False)  # the text as written: no <think> split
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": name,
                "object": "text_completion"}
        if params.stream:
            def chunk_of(choice, reasoning, content, logprobs, finish, role=False):
                return {**head, "choices": [{"index": choice, "text": content, "finish_reason": finish,
                                             "logprobs": completion_logprobs(logprobs or [], params.top_logprobs)}]}
            return stream(job, prompt_ids, chunk_of)
        choices = await collect(request, job)
        return {**head, "usage": usage(prompt_ids, sum(c[3] for c in choices)),
                "choices": [{"index": i, "text": c[1], "finish_reason": c[2],
                             "logprobs": completion_logprobs(c[4], params.top_logprobs)}
                            for i, c in enumerate(choices)]}

    @app.post("/fit_history")
    async def fit_history(request: Request):
        """The chat page's conversation without its oldest whole turns, as sample.py trims it: what fits the context
        with reply_room's share left for the reply."""
        body = await read_json(request)
        messages, (tools, choice) = chat_messages(body), chat_tools(body)
        budget = engine.context - generation.reply_room(engine.context, cfg["max_tokens"])
        kept, ids = generation.fit_history(tok, messages, budget, tools if choice != "none" else None)
        if kept is None:
            raise APIError(400, f"that message is {len(ids)} tokens with the system prompt; at most {budget} fit the "
                                f"model's context of {engine.context}", param="messages",
                           code="context_length_exceeded")
        return {"messages": kept, "dropped": len(messages) - len(kept), "prompt_tokens": len(ids),
                "context": engine.context}

    @app.get("/tools")
    async def offered_tools():
        """The tools the chat page offers (--tools, run by this server), and how many replies may call them."""
        return {"tools": page_tools.schemas if page_tools else [], "max_steps": cfg["max_tool_steps"]}

    @app.post("/tools/run")
    async def run_tool(request: Request):
        """One call of the chat page's tools ({name, arguments: the JSON text}): {content: its result}; a tool's error
        is its result's text, as sample.py feeds it back."""
        body = await read_json(request)
        if page_tools is None:
            raise APIError(404, "this server runs no tools (serve.py --tools)")
        arguments = field(body, "arguments", str, "{}")
        call = generation.parse_call(json.dumps({"name": field(body, "name", str, ""), "arguments": arguments}))
        if call is None:
            raise APIError(400, "a call is {'name': a string, 'arguments': the JSON text of an object}",
                           param="arguments")
        return {"content": await asyncio.to_thread(page_tools.run, call)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llm-trainer"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": engine.jobs.qsize(), "busy": engine.busy,
                "chat": engine.info["chat"], "context": engine.context, "generation": engine.counts}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return Guard(app, cfg)


def api_call(call):
    """A parsed call ({"name", "arguments"}) as OpenAI's API gives it: {id, type, function: {name, arguments: the
    JSON text}}."""
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def call_deltas(index, call):
    """A streamed call's two delta.tool_calls entries, as OpenAI's API sends them: its index, id, type and name (the
    arguments empty), then its arguments."""
    whole = api_call(call)
    return ({"index": index, **whole, "function": {"name": call["name"], "arguments": ""}},
            {"index": index, "function": {"arguments": whole["function"]["arguments"]}})


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def check_config(cfg):
    if bool(cfg["out_dir"]) == bool(cfg["hf_dir"]):
        configurator.fail("give exactly one of --out_dir (a run directory) or --hf_dir (an HF directory)")
    if not 0 < cfg["port"] < 65536 or min(cfg[k] for k in ("max_tokens", "max_n", "queue_size", "max_tool_steps")) < 1:
        configurator.fail("port must be in 1..65535; max_tokens, max_n, queue_size and max_tool_steps >= 1")


def main(argv=None):
    import uvicorn

    c = configurator.configure(_DEFAULTS, argv)
    check_config(c)
    path = c["out_dir"] or c["hf_dir"]
    page_tools = Tools(c["tools"]) if c["tools"] else None
    engine = Engine(path, c["device"], c["dtype"], c["queue_size"])
    app = create_app(engine, c, page_tools)
    kind = f"{engine.info['stage']} run" if engine.info["kind"] == "run" else "HF model"
    print(f"serving {path} ({kind}, {engine.model.num_params() / 1e6:.1f}M parameters, {engine.device}, context "
          f"{engine.context}) at http://{c['host']}:{c['port']}: the chat page at /, the API at /v1", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=c["host"], port=c["port"], log_level="warning")


if __name__ == "__main__":
    main()
