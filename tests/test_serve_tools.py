"""serve.py's tools, driven by the official `openai` client against a tiny model trained on tool conversations:
tool_calls streamed and not, tool_choice none/auto/required/named, a full round (call, result, answer), bad tool
specs refused with OpenAI's error JSON, and the chat page showing a call and its result in headless Chromium."""

import json
import random

import httpx
import pytest

from llm_trainer.data import tokenizer
from llm_trainer.inference import generation
from tests.helpers import Server, chat_run_dir, chromium, say

WEATHER_PY = '''
def get_weather(city: str):
    """The weather in a city.

    Args:
        city: its name
    """
    return f"sunny, {len(city) * 3} degrees"
'''
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito"]
CONTEXT = 1024


def schemas(tools_py):
    from llm_trainer.inference.tools import Tools
    return Tools(f"calculator,{tools_py}").schemas


def call_message(name, **arguments):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def tool_conversations(n, seed=0):
    """Sums that call the calculator, weather questions that call get_weather, greetings that call nothing."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        kind = rng.choice(["calc", "calc", "weather", "weather", "chat"])
        if kind == "calc":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.append([{"role": "user", "content": f"What is {a} + {b}?"},
                        call_message("calculator", expression=f"{a} + {b}"),
                        {"role": "tool", "tool_call_id": "call_1", "content": str(a + b)},
                        {"role": "assistant", "content": f"{a} + {b} = {a + b}."}])
        elif kind == "weather":
            city = rng.choice(CITIES)
            out.append([{"role": "user", "content": f"How is the weather in {city}?"},
                        call_message("get_weather", city=city),
                        {"role": "tool", "tool_call_id": "call_1", "content": f"sunny, {len(city) * 3} degrees"},
                        {"role": "assistant", "content": f"It is sunny and {len(city) * 3} degrees in {city}."}])
        else:
            out.append([{"role": "user", "content": rng.choice(["Hello!", "Hi, who are you?", "Good morning."])},
                        {"role": "assistant", "content": "Hello! I can do sums and tell the weather."}])
    return out


def tool_run_dir(path, tools, steps=150, batch=16):
    """A run directory whose model learnt, on the assistant's tokens only, when and how to call the two tools (not
    to copy the arguments: a call's form is what the tests need) and to answer after their results. The tokenizer
    learns the tools' system turn too, which keeps a row near 300 tokens (20 s of training on 2 cores)."""
    conversations = tool_conversations(256)
    texts = [m["content"] or "" for c in conversations[:100] for m in c]
    texts += ([json.dumps(t) for t in tools] + [tokenizer.TOOLS_PREAMBLE, tokenizer.TOOLS_POSTAMBLE]) * 20
    tok = tokenizer.train_tokenizer(texts * 3, 1024)
    rows = [tok.render_chat(c, tools=tools) for c in conversations]
    return chat_run_dir(path, tok, rows, steps, batch, context=CONTEXT)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_tools")
    (root / "weather.py").write_text(WEATHER_PY, encoding="utf-8")
    tools = schemas(str(root / "weather.py"))
    run = tool_run_dir(root / "run", tools)
    return {"run": run, "tools": tools, "tools_py": str(root / "weather.py")}


@pytest.fixture(scope="module")
def server(setup):
    s = Server(setup["run"], f"--tools=calculator,{setup['tools_py']}")
    yield s
    s.close()


@pytest.fixture(scope="module")
def local(setup):
    return generation.load(setup["run"])


def local_reply(local, messages, tools, choice="auto"):
    """The greedy reply as the server should make it, from the shared generation code: (ReplyStream after it,
    prompt ids)."""
    model, tok, info = local
    prefix, forced = generation.call_start(tok, None if choice == "required" else choice) \
        if choice not in ("auto", "none") else ("", [])
    ids = generation.chat_prompt_ids(tok, messages, tools if choice != "none" else None) + forced
    stream = generation.ReplyStream(model, tok, ids, generation.chat_stop_ids(tok), 96, max_len=info["block_size"],
                                    tools=choice != "none", prefix=prefix, temperature=0.0)
    stream.content = "".join(p.content for p in stream)
    return stream, ids


def assert_calls(message, expected):
    """The API's tool_calls are the parsed calls: ids call_..., type function, the name, the arguments' JSON."""
    assert len(message.tool_calls) == len(expected) > 0
    for call, want in zip(message.tool_calls, expected):
        assert call.id.startswith("call_") and len(call.id) > len("call_") and call.type == "function"
        assert (call.function.name, json.loads(call.function.arguments)) == (want["name"], want["arguments"])
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)


def streamed(client, **request):
    """A streamed reply reassembled as a client does: content, tool_calls by index (id, type and name from the
    first part, the arguments joined), finish_reason; and the tool_calls parts as they came."""
    content, calls, finish, parts = "", {}, None, []
    for chunk in client.chat.completions.create(stream=True, **request):
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        content += delta.content or ""
        for part in delta.tool_calls or []:
            parts.append(part)
            if part.index not in calls:
                assert part.id.startswith("call_") and part.type == "function" and part.function.name
                calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": ""}
            calls[part.index]["arguments"] += part.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], finish, parts


ASK_WEATHER = [{"role": "user", "content": "How is the weather in Oslo?"}]


@pytest.mark.slow
def test_a_call_comes_back_as_tool_calls_streamed_or_not(setup, server, local):
    expected, ids = local_reply(local, ASK_WEATHER, setup["tools"])
    assert expected.calls and expected.finish_reason == "stop"  # the model learnt to call: the test means something
    client = server.client()
    request = dict(model="run", messages=ASK_WEATHER, tools=setup["tools"], temperature=0, max_tokens=96)
    r = client.chat.completions.create(**request)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and r.usage.prompt_tokens == len(ids)
    assert choice.message.content == (expected.content or None)
    assert_calls(choice.message, expected.calls)
    content, calls, finish, parts = streamed(client, **request)
    assert (content, finish) == (expected.content, "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert parts[0].function.arguments == "" and parts[1].id is None  # OpenAI's order: the name, then the arguments


@pytest.mark.slow
def test_tool_choice_none_offers_no_tools(setup, server, local):
    """none: the prompt is the conversation without the tools' system turn, and no call is parsed (a <tool_call>
    the model still writes would stay text)."""
    expected, ids = local_reply(local, ASK_WEATHER, setup["tools"], "none")
    r = server.client().chat.completions.create(model="run", messages=ASK_WEATHER, tools=setup["tools"],
                                                tool_choice="none", temperature=0, max_tokens=96)
    assert r.usage.prompt_tokens == len(ids) == len(generation.chat_prompt_ids(local[1], ASK_WEATHER))
    assert r.choices[0].message.content == expected.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == expected.finish_reason


def assert_reply(client, request, expected):
    """The server's reply, streamed and not, is the reference's: its calls (finish_reason tool_calls), or its text."""
    r = client.chat.completions.create(**request)
    message, finish = r.choices[0].message, r.choices[0].finish_reason
    content, calls, streamed_finish, _ = streamed(client, **request)
    if expected.calls:
        assert_calls(message, expected.calls)
        assert finish == streamed_finish == "tool_calls" and content == expected.content
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(c["name"], c["arguments"])
                                                                            for c in expected.calls]
    else:
        assert message.content == content == expected.content and not message.tool_calls and not calls
        assert finish == streamed_finish == expected.finish_reason
    return r


HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.mark.slow
@pytest.mark.parametrize("messages, choice", [(ASK_WEATHER, "calculator"), (ASK_WEATHER, "required"),
                                              (HELLO, "required"), (HELLO, "get_weather")])
def test_tool_choice_required_and_named_force_a_call(setup, server, local, messages, choice):
    """required makes the reply start with `<tool_call>\n{"name":`, a named function with that function's name too,
    and what the model writes on from there comes back: the call, or (a tiny model's call that is not valid JSON,
    after a greeting it would answer in words) the text. The weather question calls get_weather by itself, so a
    calculator call there is the forcing's doing."""
    model, tok, _ = local
    own = local_reply(local, messages, setup["tools"])[0]
    assert [c["name"] for c in own.calls] == (["get_weather"] if messages is ASK_WEATHER else [])
    expected, ids = local_reply(local, messages, setup["tools"], choice)
    assert expected.text.startswith(generation.call_start(tok, None if choice == "required" else choice)[0])
    if messages is ASK_WEATHER:
        assert [c["name"] for c in expected.calls] == ["get_weather" if choice == "required" else choice]
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    r = assert_reply(server.client(), dict(model="run", messages=messages, tools=setup["tools"],
                                           tool_choice=tool_choice, temperature=0, max_tokens=96), expected)
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.slow
def test_a_full_round_call_result_answer(setup, server, local):
    """The call, its result in a tool message, and the answer: the second request renders the first reply's call
    to exactly the ids the model generated, and the answer is the model's."""
    model, tok, info = local
    client = server.client()
    request = dict(model="run", tools=setup["tools"], temperature=0, max_tokens=96)
    first = client.chat.completions.create(messages=ASK_WEATHER, **request).choices[0].message
    call = first.tool_calls[0]
    from llm_trainer.inference.tools import Tools
    result = Tools(f"calculator,{setup['tools_py']}").run(
        {"name": call.function.name, "arguments": json.loads(call.function.arguments)})
    conversation = ASK_WEATHER + [first.model_dump(exclude_none=True),
                                  {"role": "tool", "tool_call_id": call.id, "content": result}]
    # what the model generated, its call rendered back: the next prompt starts with the first prompt and those ids
    prompt = generation.chat_prompt_ids(tok, ASK_WEATHER, setup["tools"])
    generated = list(model.generate(prompt, 96, temperature=0, stop_ids=generation.chat_stop_ids(tok)))
    template = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in conversation]
    rendered = generation.chat_prompt_ids(tok, template, setup["tools"])
    assert rendered[: len(prompt) + len(generated)] == prompt + generated
    expected, ids = local_reply(local, template, setup["tools"])
    r = client.chat.completions.create(messages=conversation, **request)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == expected.content and expected.content and not expected.calls
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    content, calls, finish, _ = streamed(client, messages=conversation, **request)
    assert (content, calls, finish) == (expected.content, [], "stop")


def bad(**body):
    return json.dumps({"messages": [{"role": "user", "content": "x"}], **body})


CALC = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_a", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\": \"1\"}"}}]}


@pytest.mark.slow
@pytest.mark.parametrize("body, param", [
    (bad(tools={"type": "function"}), "tools"),
    (bad(tools=[{"type": "code_interpreter"}]), "tools[0]"),
    (bad(tools=[{"type": "function", "function": "calculator"}]), "tools[0].function"),
    (bad(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name"),
    (bad(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools[0].function.name"),
    (bad(tools=[CALC, CALC]), "tools[1].function.name"),
    (bad(tools=[{"type": "function", "function": {"name": "f", "description": 3}}]), "tools[0].function.description"),
    (bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools[0].function.parameters"),
    (bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["y"]}}}]),
     "tools[0].function.parameters"),
    (bad(tools=[CALC], tool_choice="sometimes"), "tool_choice"),
    (bad(tools=[CALC], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (bad(tool_choice="required"), "tool_choice"),
    (bad(tools=[CALC], tool_choice={"type": "function", "function": {"name": ["calculator"]}}), "tool_choice"),
    (bad(tools=[CALC], tool_choice=0), "tool_choice"),
    (bad(tools=[CALC], tool_choice=""), "tool_choice"),
    (bad(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"items": {"a": 1}}}}}}]).replace('{"a": 1}', "[" * 100_000 + "]" * 100_000), None),  # nested too deep
    (json.dumps({"messages": [{"role": "user", "content": "1?"}, CALLED]}), "messages"),  # ends in a call
    (json.dumps({"messages": [{"role": "user", "content": "1?"}, CALLED, {"role": "user", "content": "2?"}]}),
     "messages[2]"),  # the call is not answered
    (json.dumps({"messages": [{"role": "user", "content": "1?"}, {"role": "tool", "tool_call_id": "call_a",
                                                                   "content": "1"}]}), "messages[1].tool_call_id"),
    (json.dumps({"messages": [{"role": "user", "content": "1?"}, CALLED,
                              {"role": "tool", "tool_call_id": "call_b", "content": "1"}]}), "messages[2].tool_call_id"),
    (json.dumps({"messages": [{"role": "user", "content": "1?"}, {**CALLED, "tool_calls": [{"id": "c", "function": {
        "name": "calculator", "arguments": {"expression": "1"}}}]}]}), "messages[1].tool_calls[0]"),
    (json.dumps({"messages": [{"role": "user", "content": None}]}), "messages[0]"),
])
def test_bad_tool_specs_get_a_400_and_the_server_keeps_serving(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_call_start_is_how_the_template_starts_a_call(data_tok):
    """The forced start of a reply (tool_choice required or named) is the first ids the chat template gives a call."""
    messages = [{"role": "user", "content": "hi"}]
    prompt = generation.chat_prompt_ids(data_tok, messages, [CALC])
    for name, arguments in (("calculator", '{"expression": "1 + 2"}'), ("get_time", "{}"), ("x-y_1", '{"a": [1]}')):
        rendered, _ = data_tok.render_chat(messages + [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}}]}], tools=[CALC])
        for forced in (None, name):
            text, ids = generation.call_start(data_tok, forced)
            assert rendered[len(prompt): len(prompt) + len(ids)] == ids and data_tok.decode(ids) == text


@pytest.fixture
def page(server, tmp_path):
    """The chat page of the tool server in headless Chromium, at temperature 0."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if chromium() is None:
        pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "tools-label").is_displayed())
        driver.execute_script("document.getElementById('temperature').value = '0';")
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_the_chat_page_shows_a_call_and_its_result(setup, page, local, tmp_path):
    """The page offers the server's tools; the model's call is shown, run by the server, its result shown and fed
    back, and the answer that follows is the model's answer to that conversation."""
    from selenium.webdriver.common.by import By

    box = say(page, ASK_WEATHER[0]["content"])
    expected, _ = local_reply(local, ASK_WEATHER, setup["tools"])
    call = expected.calls[0]
    shown = box.find_element(By.CSS_SELECTOR, ".tool-call").text
    assert shown == f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"
    from llm_trainer.inference.tools import Tools
    result = Tools(f"calculator,{setup['tools_py']}").run(call)
    assert box.find_element(By.CSS_SELECTOR, ".tool-result").text == "→ " + result
    conversation = ASK_WEATHER + [generation.tool_call_message("", expected.calls), {"role": "tool", "content": result}]
    answer, _ = local_reply(local, conversation, setup["tools"])
    assert box.find_elements(By.CSS_SELECTOR, ".answer")[-1].text == answer.content.strip() != ""
    assert not box.find_elements(By.CSS_SELECTOR, ".error")
    page.save_screenshot(str(tmp_path / "tool_call.png"))
    assert (tmp_path / "tool_call.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_page_tools_are_listed_and_run_by_the_server(setup, server):
    """GET /tools: the schemas of --tools; POST /tools/run: one call's result as Tools.run gives it, a tool's failure
    as the result's text, a call that is not one a 400."""
    assert httpx.get(server.url + "/tools").json() == {"tools": setup["tools"], "max_steps": 4}

    def run(**call):
        return httpx.post(server.url + "/tools/run", json=call, timeout=30)

    assert run(name="calculator", arguments='{"expression": "147 + 85"}').json() == {"content": "232"}
    assert run(name="get_weather", arguments='{"city": "Oslo"}').json() == {"content": "sunny, 12 degrees"}
    assert run(name="calculator", arguments='{"expression": "__import__(1)"}').json()["content"].startswith("error:")
    assert run(name="nope", arguments="{}").json()["content"].startswith("error: no tool named 'nope'")
    r = run(name="calculator", arguments="{not json")
    assert r.status_code == 400 and r.json()["error"]["param"] == "arguments"
