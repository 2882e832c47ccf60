"""The OpenAI-compatible server, driven on 127.0.0.1 by the real `openai` client and raw httpx requests."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from dovetail_onnx.runtime import GeneratorParams, Model, generate
from dovetail_onnx.serve.app import MAX_BODY_BYTES, create_app

NAME = "tiny"
KEY = "sk-test"


@contextmanager
def serving(model: Model, **options):
    """A real uvicorn server on a free 127.0.0.1 port, in a thread, stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, NAME, **options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def slowed(model: Model, seconds: float) -> list[float]:
    """Every target forward of `model` takes `seconds` longer: requests overlap without depending on timing luck.
    Returns the list each forward appends its time to."""
    forward, calls = model.target.forward, []

    def slow(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.target.forward = slow
    return calls


@pytest.fixture(scope="module")
def server_model(artifacts) -> Model:
    return Model(artifacts["llama"], draft_device="cpu", threads=1)


@pytest.fixture(scope="module")
def url(server_model):
    with serving(server_model, api_key=KEY) as address:
        yield address


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(models):
    """What `generate` answers: (text, token count, finish reason) for chat messages or a raw prompt."""
    model = models["llama"]

    def answer(messages: list[dict] | None = None, prompt: str | None = None, max_tokens: int = 24):
        ids = model.tokenizer.chat(messages) if messages else model.encode_prompt(prompt, raw=True)
        tokens, _ = generate(model, ids, GeneratorParams(max_new_tokens=max_tokens))
        finish = "stop" if tokens[-1] in model.manifest.eos_token_ids else "length"
        return model.tokenizer.decode(tokens), len(tokens), finish

    return answer


def chat_messages(text: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def test_chat_greedy_equals_generate(client, reference):
    messages = chat_messages("hello there")
    text, count, finish = reference(messages)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == finish
    assert out.usage.completion_tokens == count and out.usage.prompt_tokens > 0
    assert out.model_extra["dovetail"]["new_tokens"] == count


def test_streamed_chat_equals_generate_and_ends_with_usage(client, reference):
    messages = chat_messages("stream it")
    text, count, finish = reference(messages, max_tokens=40)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=40,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count


def test_completions_stream_and_not(client, reference):
    text, count, finish = reference(prompt="Once upon", max_tokens=30)
    out = client.completions.create(model=NAME, prompt="Once upon", max_tokens=30, temperature=0)
    assert out.choices[0].text == text and out.usage.completion_tokens == count
    chunks = list(client.completions.create(model=NAME, prompt="Once upon", max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == finish


def test_stop_string_cuts_the_reply(client, reference):
    messages = chat_messages("stop early")
    text, _, _ = reference(messages, max_tokens=40)
    stop = text[10:12]
    expected = text[: text.index(stop)]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].message.content == expected and out.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


@pytest.mark.parametrize("stop", ["Banana", "\n\nUser:", ["</answer>", "Question:", "###", "\nHuman:"]])
def test_realistic_stop_strings_are_taken(client, reference, stop):
    """A stop string is text of any length; only the list is limited to 4."""
    messages = chat_messages("realistic stops")
    text, _, _ = reference(messages, max_tokens=20)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stop=stop)
    stops = [stop] if isinstance(stop, str) else stop
    cuts = [text.index(s) for s in stops if s in text]
    assert out.choices[0].message.content == text[: min(cuts, default=len(text))]


def test_a_six_character_stop_string_cuts_the_reply(client, reference):
    messages = chat_messages("stop early")
    text, _, _ = reference(messages, max_tokens=40)
    stop = text[8:14]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0, stop=stop)
    assert out.choices[0].message.content == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"


def test_a_conversation_reuses_the_last_turn(client, reference):
    messages = chat_messages("first turn")
    for turn in range(3):
        text, _, _ = reference(messages)
        out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
        assert out.choices[0].message.content == text
        if turn:
            # The last prompt at least (the tiny model's random bytes may not re-encode to the tokens it made).
            assert out.usage.prompt_tokens_details.cached_tokens >= previous - 1
        previous = out.usage.prompt_tokens
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"turn {turn + 2}"}]


def test_sampling_with_a_seed_repeats(client):
    ask = dict(model=NAME, messages=chat_messages("roll"), max_tokens=16, temperature=0.9, top_p=0.9, seed=5)
    assert client.chat.completions.create(**ask).choices[0].message.content == \
        client.chat.completions.create(**ask).choices[0].message.content


def test_models_health_and_the_api_key(url, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = httpx.get(f"{url}/v1/models", headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"


BAD = [
    ("malformed JSON", b'{"messages": [', 400, "malformed JSON"),
    ("wrong type", {"messages": "hi"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ("n > 1", {"n": 2, "messages": [{"role": "user", "content": "x"}]}, 400, "one choice per request"),
    ("over the context", {"max_tokens": 600, "messages": [{"role": "user", "content": "x"}]}, 400,
     "exceeds the model's context of 512"),
    ("long prompt", {"messages": [{"role": "user", "content": "x" * 600}]}, 400, "exceeds the model's context"),
    ("temperature", {"temperature": -1, "messages": [{"role": "user", "content": "x"}]}, 400, "temperature"),
    ("top_p", {"top_p": 0, "messages": [{"role": "user", "content": "x"}]}, 400, "top-p"),
    ("five stop strings", {"stop": ["a", "b", "c", "d", "e"], "messages": [{"role": "user", "content": "x"}]}, 400,
     "stop"),
    ("negative seed", {"seed": -1, "messages": [{"role": "user", "content": "x"}]}, 400, "seed"),
    ("max_tokens 0", {"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
    ("oversize body", {"messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}]}, 413, "request body"),
]


@pytest.mark.parametrize("case", BAD, ids=[case[0] for case in BAD])
def test_bad_requests_get_an_openai_error_and_the_server_lives_on(url, case):
    _, body, status, message = case
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = httpx.post(f"{url}/v1/chat/completions", content=data, timeout=30,
                        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    if case[0] == "negative seed":
        assert error["param"] == "seed"
    assert "\n" not in error["message"] and "Traceback" not in answer.text
    assert httpx.get(f"{url}/health").status_code == 200


def test_bad_completion_prompt(client):
    with pytest.raises(openai.BadRequestError, match="token ids must be in"):
        client.completions.create(model=NAME, prompt=[1, 99999], max_tokens=4)


def test_eight_concurrent_clients_all_answered_correctly(client, reference):
    texts = [f"client {i} says hi" for i in range(8)]
    expected = [reference(chat_messages(t))[0] for t in texts]

    def ask(i: int) -> str:
        request = dict(model=NAME, messages=chat_messages(texts[i]), max_tokens=24, temperature=0)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**request,
                                                                                                  stream=True))
        return client.chat.completions.create(**request).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == expected


@pytest.mark.parametrize("max_batch", [1, 4])
def test_past_the_queue_requests_get_429_and_the_rest_are_correct(artifacts, reference, max_batch):
    """At most `max_batch` generate and 2 wait; 8 at once leave some refused, whether they run alone or batched."""
    model = Model(artifacts["llama"], draft_device="cpu", threads=1)
    slowed(model, 0.01)
    texts = [f"queue {i}" for i in range(8)]
    expected = [reference(chat_messages(t))[0] for t in texts]
    with serving(model, max_queue=2, max_batch=max_batch) as address:
        slow_client = openai.OpenAI(base_url=f"{address}/v1", api_key="none", max_retries=0, timeout=60)

        def ask(i: int) -> str:
            try:
                return slow_client.chat.completions.create(model=NAME, messages=chat_messages(texts[i]),
                                                           max_tokens=24, temperature=0).choices[0].message.content
            except openai.RateLimitError as exc:
                assert "server is busy" in exc.message
                return "429"

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
    assert "429" in answers and sum(a != "429" for a in answers) >= 3
    assert all(a in ("429", e) for a, e in zip(answers, expected))


def test_a_client_that_disconnects_mid_stream_frees_the_model(artifacts, reference):
    model = Model(artifacts["llama"], draft_device="cpu", threads=1)
    forwards = slowed(model, 0.02)
    body = {"messages": chat_messages("a long story"), "max_tokens": 400, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with serving(model) as address:
        with httpx.stream("POST", f"{address}/v1/chat/completions", json=body, timeout=30) as answer:
            lines = answer.iter_lines()  # kept: a dropped iterator would close the connection already
            assert next(lines).startswith("data: ")  # the role chunk
            deadline = time.monotonic() + 10
            while len(forwards) < 10 and time.monotonic() < deadline:
                time.sleep(0.01)  # mid-generation (the tiny model's random bytes may not print as text yet)
        deadline = time.monotonic() + 10
        while httpx.get(f"{address}/health").json()["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{address}/health").json()["pending"] == 0
        assert 10 <= len(forwards) < 100  # stopped well before 400 tokens
        text, _, _ = reference(chat_messages("after"))
        out = openai.OpenAI(base_url=f"{address}/v1", api_key="none", max_retries=0).chat.completions.create(
            model=NAME, messages=chat_messages("after"), max_tokens=24, temperature=0)
        assert out.choices[0].message.content == text


def metric(text: str, name: str) -> float:
    """The value of one sample line of Prometheus' text format (`name{labels} value`)."""
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def test_metrics_count_requests_tokens_and_time_to_first_token(url, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(f"{url}/metrics", headers=headers)
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    finished = metric(before.text, 'dovetail_requests_total{finish_reason="length"}') if \
        'dovetail_requests_total{finish_reason="length"}' in before.text else 0.0
    tokens = metric(before.text, "dovetail_generation_tokens_total")
    ttft = metric(before.text, "dovetail_time_to_first_token_seconds_count")
    for _ in range(2):
        client.chat.completions.create(model=NAME, messages=chat_messages("metrics"), max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    after = httpx.get(f"{url}/metrics", headers=headers).text
    assert metric(after, 'dovetail_requests_total{finish_reason="length"}') == finished + 2
    assert metric(after, "dovetail_generation_tokens_total") == tokens + 2 * 11  # the first token is the prefill's
    assert metric(after, "dovetail_time_to_first_token_seconds_count") == ttft + 2
    assert metric(after, "dovetail_target_forwards_total") > 0
    assert metric(after, "dovetail_requests_running") == 0 and metric(after, "dovetail_requests_waiting") == 0
    assert httpx.get(f"{url}/metrics").status_code == 401  # like every route but /health, behind the key


def test_two_ray_serve_replicas_give_the_same_answers(artifacts, reference):
    """`serve --ray --replicas 2 --threads 1`: a local Ray instance, the app on each replica, answers unchanged."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-c", "from dovetail_onnx.cli.main import main; main()", "serve", str(artifacts["llama"]),
               "--ray", "--replicas", "2", "--threads", "1", "--draft-device", "cpu", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        if server.poll() is not None or time.monotonic() >= deadline:
            pytest.skip(f"Ray Serve did not start here: {server.stderr.read()[-300:] if server.poll() else 'timeout'}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        texts = [f"replica {i}" for i in range(6)]

        def ask(text: str) -> str:
            return client.chat.completions.create(model=artifacts["llama"].name, messages=chat_messages(text),
                                                  max_tokens=24, temperature=0).choices[0].message.content

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, texts))
        assert answers == [reference(chat_messages(t))[0] for t in texts]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
