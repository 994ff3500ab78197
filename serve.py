"""
An OpenAI-compatible HTTP server and a chat page for a run directory or an HF directory (FastAPI + uvicorn).

    python serve.py --out_dir=out/demo/sft            # http://127.0.0.1:8000, the chat page at /
    python serve.py --hf_dir=hf/sft --host=0.0.0.0 --port=8080 --api_key=...

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Who are you?"}])

Endpoints: POST /v1/chat/completions (messages, stream, temperature, top_p, max_tokens, stop, seed, n; a
reasoning model's <think> block comes back as reasoning_content, as DeepSeek's API returns it, streamed too),
POST /v1/completions (a prompt continued, for base models), GET /v1/models, GET /health, and GET / (the chat
page, serve.html: one file, no build step, nothing from a CDN).

Generations are queued: one worker thread runs one request at a time on the model, with the code sample.py uses
(generation.ReplyStream), so requests never share state; a client that disconnects stops its generation, which
frees the worker for the next. Every error is OpenAI's error JSON with a 4xx status; the server keeps serving.
"""

import asyncio
import json
import os
import queue
import secrets
import sys
import threading
import time

import torch

import configurator
import generation
from common import dtype_name, resolve_device, resolve_dtype

# -----------------------------------------------------------------------------
out_dir = ""  # a run directory (ckpt.pt + tokenizer files) ...
hf_dir = ""  # ... or an HF transformers directory
host = "127.0.0.1"  # 0.0.0.0 to listen on every interface
port = 8000
api_key = ""  # when set, requests must send "Authorization: Bearer <api_key>"
model_name = ""  # the model's id in the API ("": the directory's name)
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16
max_tokens = 512  # the most tokens a request may ask for (and what it gets when it does not say)
max_n = 4  # completions per request at most
max_request_bytes = 1_000_000  # a larger request body is refused (413)
queue_size = 64  # requests waiting for the model at most; more are refused (429)
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -----------------------------------------------------------------------------
# generation: one worker thread, requests in turn


class Job:
    """One request's generations: run on the worker thread, their events handed to the request's event loop."""

    def __init__(self, loop, prompt_ids, stop_ids, n, sampling, max_new_tokens, stop, seed):
        self.loop, self.events, self.cancelled = loop, asyncio.Queue(), threading.Event()
        self.prompt_ids, self.stop_ids, self.n, self.sampling = prompt_ids, stop_ids, n, sampling
        self.max_new_tokens, self.stop, self.seed = max_new_tokens, stop, seed

    def emit(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def run(self, engine):
        """("delta", choice, reasoning, content) as text streams, ("finish", choice, reason, tokens) per choice,
        then ("done",); ("error", message) if generation itself fails."""
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        gen = torch.Generator(engine.device).manual_seed(seed)
        for choice in range(self.n):
            stream = generation.ReplyStream(engine.model, engine.tokenizer, self.prompt_ids, self.stop_ids,
                                            self.max_new_tokens, stop=self.stop, max_len=engine.context,
                                            cancelled=self.cancelled.is_set, generator=gen, **self.sampling)
            for piece in stream:
                if piece.reasoning or piece.content:
                    self.emit("delta", choice, piece.reasoning, piece.content)
            self.emit("finish", choice, stream.finish_reason, stream.tokens)
            if self.cancelled.is_set():
                break
        self.emit("done")


class Engine:
    """The model and its tokenizer, and the one thread that generates with them, a request at a time."""

    def __init__(self, path, device_name, dtype_name_, queue_size):
        self.device = resolve_device(device_name)
        self.model, self.tokenizer, self.info = generation.load(path, self.device,
                                                                dtype_name(resolve_dtype(dtype_name_, self.device)))
        self.context = self.info["block_size"]
        self.jobs = queue.Queue(maxsize=queue_size)
        threading.Thread(target=self._work, name="generation", daemon=True).start()

    def submit(self, job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "too many requests are waiting for the model; try again later",
                           kind="rate_limit_error") from None

    def _work(self):
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():  # its client left while it waited
                job.emit("done")
                continue
            try:
                with torch.inference_mode():
                    job.run(self)
            except Exception as e:  # noqa: BLE001 -- the request fails, the server does not
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")


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


def sampling_params(body, cfg, prompt_len, context):
    """(sampling kwargs, max_new_tokens, stop strings, seed, n) of a request, each checked."""
    temperature = field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be a number in [0, 2]")
    top_p = field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be a number in (0, 1]")
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens; the model's context is {context}", param="messages",
                       code="context_length_exceeded")
    limit = cfg["max_tokens"]
    wanted = field(body, "max_tokens", int, None, lambda v: 1 <= v <= limit, f"must be an integer in [1, {limit}]")
    wanted = field(body, "max_completion_tokens", int, wanted, lambda v: 1 <= v <= limit,
                   f"must be an integer in [1, {limit}]")
    if wanted is not None and wanted > room:
        raise APIError(400, f"the prompt is {prompt_len} tokens and max_tokens {wanted}: more than the model's context "
                            f"of {context}", param="max_tokens", code="context_length_exceeded")
    stop = field(body, "stop", (str, list), [], lambda v: isinstance(v, str) or (
        len(v) <= 4 and all(isinstance(s, str) and s for s in v)), "must be a string or a list of up to 4 strings")
    seed = field(body, "seed", int)
    n = field(body, "n", int, 1, lambda v: 1 <= v <= cfg["max_n"], f"must be an integer in [1, {cfg['max_n']}]")
    return ({"temperature": float(temperature), "top_p": float(top_p)}, min(wanted or limit, room),
            [stop] if isinstance(stop, str) else stop, seed, n)


def chat_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: the text ones, joined
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must be {{'role': system|user|assistant, 'content': a string}}",
                           param=f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message must be the user's (or the system's)", param="messages")
    return out


def completion_prompt(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
    return prompt


# -----------------------------------------------------------------------------
# the app


def create_app(engine, cfg):
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

    @app.middleware("http")
    async def guard(request, call_next):
        """The API key and the size of the request, before anything else."""
        if request.url.path.startswith("/v1/") and cfg["api_key"]:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {cfg['api_key']}".encode()):
                e = APIError(401, "invalid API key: send 'Authorization: Bearer <key>'", kind="authentication_error",
                             code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > cfg["max_request_bytes"]:
            e = APIError(413, f"the request is larger than {cfg['max_request_bytes']} bytes")
            return JSONResponse(e.body(), status_code=413)
        return await call_next(request)

    async def read_json(request):
        raw = await request.body()
        if len(raw) > cfg["max_request_bytes"]:
            raise APIError(413, f"the request is larger than {cfg['max_request_bytes']} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def start(request, body, prompt_ids, stop_ids):
        sampling, max_new, stop, seed, n = sampling_params(body, cfg, len(prompt_ids), engine.context)
        job = Job(asyncio.get_running_loop(), prompt_ids, stop_ids, n, sampling, max_new, stop, seed)
        engine.submit(job)
        return job

    async def collect(request, job):
        """Every choice's (reasoning, content, finish reason, tokens), waiting for the worker; a client that left
        cancels its generation."""
        choices = [["", "", None, 0] for _ in range(job.n)]
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                continue
            if event[0] == "delta":
                choices[event[1]][0] += event[2]
                choices[event[1]][1] += event[3]
            elif event[0] == "finish":
                choices[event[1]][2:] = event[2:]
            elif event[0] == "error":
                raise APIError(500, event[1], kind="server_error")
            else:
                return choices

    def usage(prompt_ids, tokens):
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": tokens, "total_tokens": len(prompt_ids) + tokens}

    def stream(job, prompt_ids, chunk_of, include_usage):
        """The server-sent events of a streamed response, OpenAI's chunk format; when the client goes, its
        generation is cancelled."""
        async def events():
            tokens = 0
            try:
                for choice in range(job.n):
                    yield sse(chunk_of(choice, {"role": "assistant", "content": ""}, None))
                while True:
                    event = await job.events.get()
                    if event[0] == "delta":
                        delta = {k: v for k, v in (("reasoning_content", event[2]), ("content", event[3])) if v}
                        yield sse(chunk_of(event[1], delta, None))
                    elif event[0] == "finish":
                        tokens += event[3]
                        yield sse(chunk_of(event[1], {}, event[2]))
                    elif event[0] == "error":
                        yield sse(APIError(500, event[1], kind="server_error").body())
                        break
                    else:
                        if include_usage:
                            yield sse({**chunk_of(0, {}, None), "choices": [], "usage": usage(prompt_ids, tokens)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        prompt_ids = generation.chat_prompt_ids(tok, chat_messages(body))
        job = start(request, body, prompt_ids, generation.chat_stop_ids(tok))
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "created": created, "model": name}
        if field(body, "stream", bool, False):
            def chunk_of(choice, delta, finish):
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": choice, "delta": delta, "finish_reason": finish}]}
            include = (field(body, "stream_options", dict, {}) or {}).get("include_usage") is True
            return stream(job, prompt_ids, chunk_of, include)
        choices = await collect(request, job)
        return {**head, "object": "chat.completion", "usage": usage(prompt_ids, sum(c[3] for c in choices)),
                "choices": [{"index": i, "finish_reason": c[2],
                             "message": {"role": "assistant", "content": c[1],
                                         **({"reasoning_content": c[0]} if c[0] else {})}}
                            for i, c in enumerate(choices)]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt_ids = generation.complete_prompt_ids(tok, completion_prompt(body))
        job = start(request, body, prompt_ids, (tok.eot_id,))
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "created": created, "model": name, "object": "text_completion"}
        if field(body, "stream", bool, False):
            def chunk_of(choice, delta, finish):
                text = delta.get("reasoning_content", "") + delta.get("content", "")
                return {**head, "choices": [{"index": choice, "text": text, "finish_reason": finish}]}
            return stream(job, prompt_ids, chunk_of, False)
        choices = await collect(request, job)
        return {**head, "usage": usage(prompt_ids, sum(c[3] for c in choices)),
                "choices": [{"index": i, "text": c[0] + c[1], "finish_reason": c[2]} for i, c in enumerate(choices)]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llm-trainer"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": engine.jobs.qsize(), "chat": engine.info["chat"]}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def check_config(c):
    if bool(c["out_dir"]) == bool(c["hf_dir"]):
        configurator.fail("give exactly one of --out_dir (a run directory) or --hf_dir (an HF directory)")
    if not 0 < c["port"] < 65536 or c["max_tokens"] < 1 or c["max_n"] < 1 or c["queue_size"] < 1:
        configurator.fail("port must be in 1..65535; max_tokens, max_n and queue_size >= 1")


def main(argv=None):
    import uvicorn

    c = configurator.configure(_DEFAULTS, argv)
    check_config(c)
    path = c["out_dir"] or c["hf_dir"]
    engine = Engine(path, c["device"], c["dtype"], c["queue_size"])
    app = create_app(engine, c)
    kind = f"{engine.info['stage']} run" if engine.info["kind"] == "run" else "HF model"
    print(f"serving {path} ({kind}, {engine.model.num_params() / 1e6:.1f}M parameters, {engine.device}, context "
          f"{engine.context}) at http://{c['host']}:{c['port']}: the chat page at /, the API at /v1", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=c["host"], port=c["port"], log_level="warning")


if __name__ == "__main__":
    main()
