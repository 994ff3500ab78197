"""serve.py on 127.0.0.1, driven by the official `openai` client, raw HTTP for bad requests, and a real headless
browser for the chat page."""

import json
import os
import threading
import time

import httpx
import openai
import pytest
import torch

from llm_trainer.inference import generation
from llm_trainer.core.checkpoint import save_checkpoint
from model import ModelConfig, Transformer
from llm_trainer.data.tokenizer import train_tokenizer
from tests.helpers import DEMO, Server, chromium, complete, demo_lines

pytestmark = pytest.mark.slow  # serve.py in a subprocess, a headless browser

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，你是谁？"},
            {"role": "assistant", "content": "我是一个小模型。"}, {"role": "user", "content": "What is 2 + 3?"}]


def reasoning_run_dir(path, steps=80):
    """A run directory whose model has learnt the shape of the demo's reasoning replies: <think> ... </think>."""
    torch.manual_seed(0)
    tok = train_tokenizer(demo_lines(), 400)
    with open(os.path.join(DEMO, "reason_train.jsonl"), encoding="utf-8") as f:
        chats = [json.loads(line)["conversations"] for _, line in zip(range(48), f)]
    rows = [tok.render_chat(c)[0][:96] for c in chats]
    data = torch.tensor([r + [tok.eot_id] * (97 - len(r)) for r in rows])
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    os.makedirs(path, exist_ok=True)
    save_checkpoint(str(path), {"model": model.state_dict(), "model_config": cfg.to_dict(), "stage": "sft",
                                "iter": steps, "config": {"block_size": 256, "stage": "sft"}})
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def runs(made_run, tmp_path_factory):
    return {"sft": made_run("sft"), "pretrain": made_run("pretrain"),
            "reason": reasoning_run_dir(tmp_path_factory.mktemp("serve") / "reason")}


@pytest.fixture(scope="module")
def sft(runs):
    server = Server(runs["sft"], "--max_n=16")
    yield server
    server.close()


@pytest.fixture(scope="module")
def reason(runs):
    server = Server(runs["reason"])
    yield server
    server.close()


@pytest.fixture(scope="module")
def local(runs):
    """The sft model in this process, as sample.py loads it."""
    return generation.load(runs["sft"])


def test_chat_streamed_and_not_equal_sample_py(sft, local):
    model, tok, info = local
    expected = generation.reply(model, tok, MESSAGES, temperature=0.0, max_new_tokens=24, max_len=info["block_size"])
    assert expected  # the test compares something
    client = sft.client()
    r = client.chat.completions.create(model="sft", messages=MESSAGES, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == expected and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(generation.chat_prompt_ids(tok, MESSAGES))
    assert r.usage.completion_tokens <= 24 and r.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="sft", messages=MESSAGES, temperature=0, max_tokens=24, stream=True) if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1  # really streamed
    assert [m.id for m in client.models.list().data] == ["sft"]


def test_n_with_a_seed_is_reproducible(sft):
    client = sft.client()
    ask = lambda: [c.message.content for c in client.chat.completions.create(  # noqa: E731
        model="sft", messages=MESSAGES[1:2], temperature=1.0, max_tokens=16, n=2, seed=7).choices]
    first = ask()
    assert len(first) == 2 and first == ask()


def test_stop_strings_cut_the_reply(sft, local):
    model, tok, info = local
    full = generation.reply(model, tok, MESSAGES, temperature=0.0, max_new_tokens=24, max_len=info["block_size"])
    cut = full[3:6]  # a piece of the reply that is not its start
    r = sft.client().chat.completions.create(model="sft", messages=MESSAGES, temperature=0, max_tokens=24, stop=[cut])
    assert r.choices[0].message.content == full[: full.index(cut)] and r.choices[0].finish_reason == "stop"


def test_a_reasoning_model_returns_reasoning_content(runs, reason):
    client, messages = reason.client(), [{"role": "user", "content": "Compute 361 + 968."}]
    model, tok, info = generation.load(runs["reason"])
    raw = generation.reply(model, tok, messages, temperature=0.0, max_new_tokens=96, max_len=info["block_size"])
    assert raw.startswith("<think>")  # the model learnt the format: the test means something
    reasoning, content = generation.split_think(raw)
    r = client.chat.completions.create(model="reason", messages=messages, temperature=0, max_tokens=96)
    message = r.choices[0].message
    assert message.reasoning_content == reasoning and message.content == content and "<think>" not in content
    chunks = list(client.chat.completions.create(model="reason", messages=messages, temperature=0, max_tokens=96,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_continue_a_base_model(runs):
    server = Server(runs["pretrain"])
    try:
        model, tok, info = generation.load(runs["pretrain"])
        expected = complete(model, tok, "The night was", temperature=0.0, max_new_tokens=20)
        r = server.client().completions.create(model="pre", prompt="The night was", temperature=0, max_tokens=20)
        assert r.choices[0].text == expected and expected
    finally:
        server.close()


def stream_reply(server, results, i, disconnect=False):
    """One streaming client: its reply (and its time to the first token), or None after leaving mid-stream."""
    client, t0, text, first = server.client(), time.time(), [], None
    stream = client.chat.completions.create(model="sft", messages=MESSAGES, temperature=0, max_tokens=24, stream=True)
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            first = first or time.time() - t0
            text.append(piece)
            if disconnect:
                stream.close()  # the client goes away mid-stream
                results[i] = None
                return
    results[i] = ("".join(text), first)


def test_16_streaming_clients_at_once_one_leaving(sft, local):
    model, tok, info = local
    expected = generation.reply(model, tok, MESSAGES, temperature=0.0, max_new_tokens=24, max_len=info["block_size"])
    results, health = [None] * 16, []
    threads = [threading.Thread(target=stream_reply, args=(sft, results, i, i == 5)) for i in range(16)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):  # the server answers /health throughout
        health.append(httpx.get(sft.url + "/health", timeout=5).status_code)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert all(code == 200 for code in health) and len(health) > 3
    assert results[5] is None
    assert [r[0] for i, r in enumerate(results) if i != 5] == [expected] * 15  # complete, correct, none mixed
    deadline = time.time() + 20
    while httpx.get(sft.url + "/health").json()["waiting"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(sft.url + "/health").json()["waiting"] == 0


@pytest.mark.parametrize("body, status, param", [
    (b'{"messages": [', 400, None),  # malformed JSON
    (b'[1, 2]', 400, None),
    (json.dumps({"messages": "hi"}), 400, "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0]"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 100}), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}), 400, "stream"),
    (json.dumps({"messages": [{"role": "user", "content": "很长的问题 " * 400}]}), 400, "messages"),  # over the context
    (json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}), 413, None),
    # odd values are 400s, not 500s
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "seed": 2**64}), 400, "seed"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "seed": 2**64, "stream": True}), 400, "seed"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}), 400, "messages[0]"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400,
     "messages[0]"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": ""}), 400, "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400, "top_logprobs"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}), 400,
     "top_logprobs"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": "yes"}}), 400,
     "include_usage"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 2.5}), 400, "frequency_penalty"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "presence_penalty": -2.01}), 400, "presence_penalty"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "presence_penalty": "high"}), 400, "presence_penalty"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}), 400, "repetition_penalty"),
])
def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(sft, body, status, param):
    r = httpx.post(sft.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert httpx.get(sft.url + "/health").status_code == 200


def test_unknown_route_and_api_key(runs):
    server = Server(runs["sft"], "--api_key=s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").chat.completions.create(model="sft", messages=MESSAGES, max_tokens=4)
        r = server.client("s3cret").chat.completions.create(model="sft", messages=MESSAGES, max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
        r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 404 and r.json()["error"]["message"]
        assert httpx.get(server.url + "/health").status_code == 200  # no key needed there
    finally:
        server.close()


LONG = {"prompt": "床前明月光", "temperature": 0, "max_tokens": 200, "n": 16}  # greedy: to max_tokens, 16 times


def counts(server):
    return httpx.get(server.url + "/health").json()["generation"]


def wait_idle(server, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        h = httpx.get(server.url + "/health").json()
        if not h["waiting"] and not h.get("busy"):
            return h.get("generation")
        time.sleep(0.05)
    raise AssertionError("the server is still generating")


def abandon(server, body, timeout):
    """A non-streamed request whose client gives up after `timeout` seconds."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=timeout)


def test_a_non_streamed_request_stops_generating_when_its_client_leaves(sft, local):
    model, tok, info = local
    alone = generation.ReplyStream(model, tok, generation.complete_prompt_ids(tok, LONG["prompt"]), (tok.eot_id,),
                                   LONG["max_tokens"], max_len=info["block_size"], temperature=0.0)
    list(alone)
    assert alone.finish_reason == "length"  # uncancelled, it would generate 16 x 200 tokens (seconds)
    before = wait_idle(sft)
    abandon(sft, LONG, 0.3)
    after = wait_idle(sft)
    assert after["cancelled"] - before["cancelled"] == 1 and after["run"] - before["run"] == 1
    assert after["tokens"] - before["tokens"] < LONG["n"] * LONG["max_tokens"]
    assert after["max_cancel_lag_ms"] < 1000  # it stopped at its next token, not when its choices were done
    # a request that waits in the queue and is abandoned there never runs
    first = threading.Thread(target=abandon, args=(sft, LONG, 0.4))
    first.start()
    time.sleep(0.1)
    abandon(sft, LONG, 0.15)
    first.join()
    later = wait_idle(sft)
    assert later["skipped"] - after["skipped"] == 1 and later["run"] - after["run"] == 1
    assert later["cancelled"] - after["cancelled"] == 1


def test_a_refused_request_costs_no_generation(sft):
    before = wait_idle(sft)
    for _ in range(8):  # an invalid "stream" value: refused before anything is queued
        r = httpx.post(sft.url + "/v1/completions", json={**LONG, "stream": "true"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    h = httpx.get(sft.url + "/health").json()
    assert h["waiting"] == 0  # none of them was queued ...
    assert not h["busy"] and h["generation"]["accepted"] == before["accepted"]  # ... nor run


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's peak memory from /proc")
def test_an_oversized_body_gets_413_json_without_being_kept(sft):
    before = peak_rss_mb(sft.proc.pid)
    chunks = (b"x" * 1_000_000 for _ in range(64))  # 64 MB, chunked: no Content-Length
    r = httpx.post(sft.url + "/v1/chat/completions", content=chunks, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"]
    assert peak_rss_mb(sft.proc.pid) - before < 16  # counted as it came, dropped: never held
    r = httpx.post(sft.url + "/v1/chat/completions", content=b"x" * 6_000_000, timeout=60)  # with Content-Length
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = sft.client().chat.completions.create(model="sft", messages=MESSAGES, temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_odd_values_are_handled(sft, local):
    model, tok, info = local
    expected = generation.reply(model, tok, MESSAGES, temperature=0.0, max_new_tokens=24, max_len=info["block_size"])
    r = sft.client().chat.completions.create(model="sft", messages=MESSAGES, temperature=1e-40, max_tokens=24)
    assert r.choices[0].message.content == expected  # a tiny temperature is greedy, not inf/nan probabilities
    developer = [{"role": "developer", "content": MESSAGES[0]["content"]}] + MESSAGES[1:]
    r = sft.client().chat.completions.create(model="sft", messages=developer, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == expected  # developer is the newer clients' system


def test_penalties_are_sample_py_s(sft, local):
    """frequency_penalty and presence_penalty (the openai client's own arguments) and repetition_penalty (vLLM's, in
    extra_body) give the reply generation.reply gives with them, streamed or not, on both endpoints."""
    model, tok, info = local
    penalties = {"frequency_penalty": 0.8, "presence_penalty": -0.3, "repetition_penalty": 1.2}
    expected = generation.reply(model, tok, MESSAGES, temperature=0.0, max_new_tokens=40, max_len=info["block_size"],
                                **penalties)
    assert expected != generation.reply(model, tok, MESSAGES, temperature=0.0, max_new_tokens=40,
                                        max_len=info["block_size"])  # the penalties change the reply
    client = sft.client()
    ask = dict(model="sft", messages=MESSAGES, temperature=0, max_tokens=40, frequency_penalty=0.8,
               presence_penalty=-0.3, extra_body={"repetition_penalty": 1.2})
    assert client.chat.completions.create(**ask).choices[0].message.content == expected
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                   if c.choices) == expected
    ids = generation.complete_prompt_ids(tok, "床前明月光，")
    alone = generation.ReplyStream(model, tok, ids, (tok.eot_id,), 30, max_len=info["block_size"], temperature=0.0,
                                   **penalties)
    r = client.completions.create(model="sft", prompt="床前明月光，", temperature=0, max_tokens=30, frequency_penalty=0.8,
                                  presence_penalty=-0.3, extra_body={"repetition_penalty": 1.2})
    assert r.choices[0].text == "".join(p.content for p in alone)


def test_max_tokens_past_the_context_is_clamped(sft, local):
    model, tok, info = local
    prompt = "床前明月光，" * 200
    ids = generation.complete_prompt_ids(tok, prompt)[: info["block_size"] - 5]
    prompt = tok.decode(ids[1:])
    ids = generation.complete_prompt_ids(tok, prompt)
    room = info["block_size"] - len(ids)
    assert 0 < room < 16
    alone = generation.ReplyStream(model, tok, ids, (tok.eot_id,), room, max_len=info["block_size"], temperature=0.0)
    text = "".join(p.content for p in alone)
    for wanted in (256, 10**6):  # every client's default is more than this context leaves
        r = sft.client().completions.create(model="sft", prompt=prompt, temperature=0, max_tokens=wanted)
        assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (
            text, alone.finish_reason, alone.tokens)


def test_logprobs_are_the_model_s(sft, local):
    model, tok, info = local
    client = sft.client()
    r = client.chat.completions.create(model="sft", messages=MESSAGES, temperature=0, max_tokens=12, logprobs=True,
                                       top_logprobs=3)
    entries = r.choices[0].logprobs.content
    ids = generation.chat_prompt_ids(tok, MESSAGES)
    generated = [next(i for i, b in enumerate(tok.id_bytes()) if bytes(b) == bytes(e.bytes) and
                      tok.decode([i]) == e.token) for e in entries]
    with torch.no_grad():
        reference = model(torch.tensor([ids + generated]))[0, len(ids) - 1:-1].float().log_softmax(-1)
    assert len(entries) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for e, row, token in zip(entries, reference, generated):
        assert abs(e.logprob - float(row[token])) < 1e-4 and token == int(row.argmax())  # greedy: the top one
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") == r.choices[0].message.content
    streamed = [c.choices[0].logprobs.content for c in client.chat.completions.create(
        model="sft", messages=MESSAGES, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [e.logprob for chunk in streamed for e in chunk] == [e.logprob for e in entries]
    c = client.completions.create(model="sft", prompt="The night was", temperature=0, max_tokens=8, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert all(max(top.values()) == pytest.approx(p, abs=1e-6) for top, p in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = list(client.completions.create(model="sft", prompt="The night was", temperature=0, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    assert chunks[-1].usage.completion_tokens == c.usage.completion_tokens


def test_logprobs_cover_only_the_returned_text(sft):
    """A stop string cuts the logprobs with the text: no entry for a token past the cut (nor for the held-back start
    of a stop string), streamed or not, in chat and in completions."""
    client = sft.client()
    full = client.completions.create(model="sft", prompt="The night was", temperature=0, max_tokens=12).choices[0].text
    assert len(full) > 8
    for stop in (full[:2], full[5:8]):
        c = client.completions.create(model="sft", prompt="The night was", temperature=0, max_tokens=12, stop=[stop],
                                      logprobs=1).choices[0]
        assert c.text == full[: full.index(stop)] and c.finish_reason == "stop"
        assert all(o < len(c.text) for o in c.logprobs.text_offset)
        assert "".join(c.logprobs.tokens).startswith(c.text)
    reply = client.chat.completions.create(model="sft", messages=MESSAGES, temperature=0, max_tokens=12)
    content = reply.choices[0].message.content
    assert len(content) > 4
    stop = content[1:3]
    for stream in (False, True):
        r = client.chat.completions.create(model="sft", messages=MESSAGES, temperature=0, max_tokens=12, stop=[stop],
                                           logprobs=True, stream=stream)
        if stream:
            chunks = [c.choices[0] for c in r if c.choices]
            text = "".join(c.delta.content or "" for c in chunks)
            entries = [e for c in chunks if c.logprobs for e in c.logprobs.content]
        else:
            text, entries = r.choices[0].message.content, r.choices[0].logprobs.content
        assert text == content[: content.index(stop)]
        # in bytes: a character's bytes may come in two tokens, the second starting inside it
        starts = [len(b"".join(bytes(e.bytes) for e in entries[:k])) for k in range(len(entries))]
        assert all(s < len(text.encode("utf-8")) for s in starts), (text, starts)
        assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace").startswith(text)


def test_completions_return_the_text_as_written(runs, reason):
    """A distilled model's continuation, <think> and all, with stop strings applied to all of it."""
    model, tok, info = generation.load(runs["reason"])
    prompt = "user\nCompute 361 + 968.\nassistant\n"
    raw = complete(model, tok, prompt, temperature=0.0, max_new_tokens=64, max_len=info["block_size"])
    assert raw.startswith("<think>")  # the model writes a think block here: the test means something
    client = reason.client()
    r = client.completions.create(model="reason", prompt=prompt, temperature=0, max_tokens=64)
    assert r.choices[0].text == raw
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="reason", prompt=prompt, temperature=0, max_tokens=64, stream=True))
    assert streamed == raw
    stop = raw[12:16]  # inside the think block
    r = client.completions.create(model="reason", prompt=prompt, temperature=0, max_tokens=64, stop=[stop])
    assert r.choices[0].text == raw[: raw.index(stop)] and r.choices[0].finish_reason == "stop"


@pytest.fixture
def page(sft, tmp_path):
    """The chat page of the sft server in headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if chromium() is None:
        pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run does)")
    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(sft.url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "title").text == "sft")
        yield driver
    finally:
        driver.quit()
