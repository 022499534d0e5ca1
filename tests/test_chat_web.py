"""scripts.chat_web on a plain GPT: the page, health, OpenAI's chat completions (streamed and not) equal to the
engine, stop strings and usage, request limits as OpenAI error objects, a real server, and the security and
concurrency rules (API key, origins, hosts, body size, 503, interleaving)."""
import os
import threading
import time
from dataclasses import asdict

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from chat_server import REPO, chat_web_process, chunks_text, serve_in_thread, sse_data  # noqa: F401
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.server.scheduler import FairLock
from nanochat.server.turns import StopStrings
from nanochat.tokenizer import get_tokenizer
from scripts.chat_web import Defaults, Limits, create_app


def tiny_model(tokenizer, seed=0):
    """Depth-1 random GPT whose stop tokens never win greedily (zeroed lm_head rows => logit 0, while
    the best other logit is positive), so a greedy reply is exactly max_tokens tokens long."""
    torch.manual_seed(seed)
    model = GPT(config_from_depth(1, tokenizer.get_vocab_size(), sequence_len=64))
    model.init_weights()
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model.eval()


def greedy_reply(model, tokenizer, messages, max_tokens):
    prompt = tokenizer.render_for_completion({"messages": messages})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return tokenizer.decode(results[0][len(prompt):])


def _user(text="hello"):
    return {"role": "user", "content": text}


def post(client, body, **kw):
    return client.post("/v1/chat/completions", json=body, **kw)


@pytest.fixture
def served(tiny_base_env):
    tok = get_tokenizer()
    model = tiny_model(tok)
    limits = Limits(max_messages=5, max_message_chars=200, max_total_tokens=60, max_max_tokens=16)
    client = TestClient(create_app(model, tok, limits=limits, defaults=Defaults(max_tokens=8), source="test"))
    return client, model, tok


def test_index_health_and_models(served):
    client, _, _ = served
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>nanochat</title>" in r.text and "/v1/chat/completions" in r.text
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["source"] == "test" and h["limits"]["max_messages"] == 5 and not h["memory"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["nanochat-test"]
    assert client.get("/v1/models/nanochat-test").json()["object"] == "model"
    assert client.get("/v1/models/gpt-4").json()["error"]["code"] == "model_not_found"


MESSAGES = [_user("Tell me about the queen."), {"role": "assistant", "content": "She lives in the castle."},
            _user("And the king?")]


def test_stream_matches_engine(served):
    client, model, tok = served
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "nanochat-test", "messages": MESSAGES, "temperature": 0, "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_data(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks_text(chunks) == greedy_reply(model, tok, MESSAGES, 9) and len(chunks) > 4
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    prompt = tok.render_for_completion({"messages": MESSAGES})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": len(prompt), "completion_tokens": 9, "total_tokens": len(prompt) + 9}


def test_completion_object_and_stop_strings(served):
    client, model, tok = served
    reply = greedy_reply(model, tok, MESSAGES, 12)
    r = post(client, {"messages": MESSAGES, "temperature": 0, "max_tokens": 12})
    out = r.json()
    assert r.status_code == 200 and out["object"] == "chat.completion" and out["model"] == "nanochat-test"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": reply}
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 12
    stop = reply[len(reply) // 2:len(reply) // 2 + 3]
    assert stop.strip() and len(reply) > 6
    for stream in (False, True):
        r = post(client, {"messages": MESSAGES, "temperature": 0, "max_tokens": 12, "stop": ["zzzz", stop],
                          "stream": stream})
        if stream:
            chunks = sse_data(r.text.splitlines())[:-1]
            text, finish = chunks_text(chunks), chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
        assert text == reply[:reply.index(stop)] and finish == "stop"
    # content as OpenAI's list of text parts reads the same as a string
    parts = [{"role": "user", "content": [{"type": "text", "text": "And the "}, {"type": "text", "text": "king?"}]}]
    r = post(client, {"messages": parts, "temperature": 0, "max_tokens": 5})
    assert r.json()["choices"][0]["message"]["content"] == greedy_reply(model, tok, [_user("And the king?")], 5)


def test_stop_strings_held_back_across_pieces():
    s = StopStrings(["END", "xy"])
    assert s.feed("abcE") == ("abc", False)   # "E" could start "END"
    assert s.feed("Nq") == ("ENq", False)
    assert s.feed("ax") == ("a", False)
    assert s.feed("yz") == ("", True)


def test_sampling_params_accepted(served):
    client, _, _ = served
    r = post(client, {"messages": [_user("hi")], "temperature": 1.5, "top_k": 5, "max_tokens": 3, "seed": 7,
                      "top_p": 0.9, "user": "someone"})  # OpenAI fields we do not use are ignored
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    again = post(client, {"messages": [_user("hi")], "temperature": 1.5, "top_k": 5, "max_tokens": 3, "seed": 7})
    assert again.json()["choices"][0]["message"] == r.json()["choices"][0]["message"]  # a seed repeats the sample


@pytest.mark.parametrize("body, needle, param", [
    ({"messages": []}, "non-empty list", "messages"),
    ({}, "non-empty list", "messages"),
    ([1, 2], "JSON object", None),
    ({"messages": [_user(), {"role": "assistant", "content": "x"}] * 2 + [_user(), _user()]}, "too many messages",
     "messages"),
    ({"messages": [_user("x" * 201)]}, "too long: 201 characters", "messages"),
    ({"messages": [_user("1234567890" * 19)]}, "the conversation is too long", "messages"),  # ~100 tokens
    ({"messages": [_user()], "temperature": 2.5}, "temperature must be between", "temperature"),
    ({"messages": [_user()], "temperature": -0.1}, "temperature must be between", "temperature"),
    ({"messages": [_user()], "temperature": "hot"}, "temperature must be a number", "temperature"),
    ({"messages": [_user()], "top_k": 201}, "top_k must be between", "top_k"),
    ({"messages": [_user()], "top_k": 2.5}, "top_k must be an integer", "top_k"),
    ({"messages": [_user()], "max_tokens": 0}, "max_tokens must be between", "max_tokens"),
    ({"messages": [_user()], "max_tokens": 17}, "max_tokens must be between", "max_tokens"),
    ({"messages": [_user()], "max_completion_tokens": 17}, "max_completion_tokens must be between",
     "max_completion_tokens"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "has role 'robot'", "messages"),
    ({"messages": [{"role": "user"}]}, 'string "role" and "content"', "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content parts", "messages"),
    ({"messages": [_user("   ")]}, "message 0 is empty", "messages"),
    ({"messages": [_user(), {"role": "assistant", "content": "x"}]}, "last message must be from the user",
     "messages"),
    ({"messages": [_user(), _user()]}, "alternate", "messages"),
    ({"messages": [_user()], "n": 2}, "only n=1", "n"),
    ({"messages": [_user()], "stop": ["a", "b", "c", "d", "e"]}, "stop must be", "stop"),
    ({"messages": [_user()], "stop": [""]}, "stop must be", "stop"),
    ({"messages": [_user()], "conversation_id": "a/b"}, "conversation_id must be", "conversation_id"),
])
def test_limits_rejected_with_openai_error_objects(served, body, needle, param):
    client, _, _ = served
    r = post(client, body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error" and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}


def test_unknown_model_and_bad_json(served):
    client, _, _ = served
    r = post(client, {"model": "gpt-4", "messages": [_user()]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert client.get("/v1/conversations").json()["error"]["code"] == "no_memory"  # a plain model keeps none


def test_defaults_must_fit_the_limits(tiny_base_env):
    tok = get_tokenizer()
    with pytest.raises(ValueError, match="max_tokens must be between"):
        create_app(tiny_model(tok), tok, limits=Limits(max_max_tokens=16))  # default max_tokens 512


class Broken:
    def prompt_ids(self, messages):
        return [1, 2, 3]

    def stream(self, messages, **kw):
        yield "partial"
        raise RuntimeError("out of memory")


def test_generation_error_reported_in_band(tiny_base_env):
    client = TestClient(create_app(chat=Broken()))
    events = sse_data(post(client, {"messages": [_user()], "stream": True}).text.splitlines())
    assert chunks_text(events[:2]) == "partial" and "out of memory" in events[2]["error"]["message"]
    assert events[2]["error"]["type"] == "server_error" and events[3:] == ["[DONE]"]
    r = post(client, {"messages": [_user()]})  # not streamed: the error is the response
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
    assert client.get("/health").json()["active"] == 0  # the slots were given back


def test_real_uvicorn_server(tiny_base_env):
    """Start the real server on a tiny saved checkpoint, chat over HTTP, read the stream."""
    from nanochat.checkpoint_manager import save_checkpoint
    tok = get_tokenizer()
    model = tiny_model(tok, seed=1)
    save_checkpoint(os.path.join(tiny_base_env, "chatsft_checkpoints", "d1"), 3, {"gpt": model.state_dict()},
                    None, {"model_config": asdict(model.config), "step": 3})
    with chat_web_process(tiny_base_env, "--source", "sft") as url:
        messages = [_user("Is the door open?")]
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={"messages": messages, "temperature": 0, "max_tokens": 6, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_data(r.iter_lines())
        assert events[-1] == "[DONE]" and chunks_text(events[:-1]) == greedy_reply(model, tok, messages, 6)
        assert "<title>nanochat</title>" in httpx.get(url + "/", timeout=10).text
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [_user()], "top_k": 1000}, timeout=10)
        assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]
        # a loopback server answers only loopback host names (DNS rebinding) and its own page's origin
        r = httpx.get(url + "/health", headers={"Host": "evil.example"}, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [_user()]}, timeout=10,
                       headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"


def test_long_transcript_without_memory_gets_a_notice(tiny_base_env):
    """No MegaContext weights: a transcript past the window is cut to its newest tokens, said in-band."""
    tok = get_tokenizer()
    model = tiny_model(tok)  # sequence_len 64
    client = TestClient(create_app(model, tok, limits=Limits(max_max_tokens=16), defaults=Defaults(max_tokens=8)))
    messages = [_user("the river and the castle " * 30)]
    r = post(client, {"messages": messages, "temperature": 0, "max_tokens": 8, "stream": True,
                      "conversation_id": "abc_DEF-123"})  # valid, unused without memory
    events = sse_data(r.text.splitlines())
    notices = [e["notice"] for e in events if isinstance(e, dict) and "notice" in e]
    assert r.status_code == 200 and len(notices) == 1 and "keeping the most recent 56" in notices[0]
    ids = tok.render_for_completion({"messages": messages})
    kept = ids[:1] + ids[-55:]
    results, _ = Engine(model, tok).generate_batch(kept, max_tokens=8, temperature=0.0)
    assert chunks_text(events[:-1]) == tok.decode(results[0][len(kept):])
    out = post(client, {"messages": messages, "temperature": 0, "max_tokens": 8}).json()
    assert out["notices"] == notices and out["usage"]["prompt_tokens"] == 56  # what the model read
    assert client.get("/v1/conversations/abc").status_code == 404


# --- security ----------------------------------------------------------------------------------


def test_api_key_on_every_route_but_the_page(tiny_base_env):
    tok = get_tokenizer()
    client = TestClient(create_app(tiny_model(tok), tok, limits=Limits(max_max_tokens=16),
                                   defaults=Defaults(max_tokens=4), api_key="s3cret"))
    body = {"messages": [_user()], "max_tokens": 2}
    assert client.get("/").status_code == 200  # the page holds no data; it asks for the key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for r in (client.get("/health", headers=headers), client.get("/v1/models", headers=headers),
                  post(client, body, headers=headers), client.get("/nope", headers=headers)):
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    ok = {"Authorization": "Bearer s3cret"}
    assert client.get("/health", headers=ok).status_code == 200
    assert post(client, body, headers=ok).json()["usage"]["completion_tokens"] == 2


def test_origins_hosts_and_body_size(tiny_base_env):
    tok = get_tokenizer()
    model = tiny_model(tok)
    kw = dict(limits=Limits(max_max_tokens=16, max_request_bytes=2000), defaults=Defaults(max_tokens=4))
    client = TestClient(create_app(model, tok, **kw))
    body = {"messages": [_user()], "max_tokens": 2}
    assert post(client, body, headers={"Origin": "http://testserver"}).status_code == 200  # its own page
    r = post(client, body, headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 403 and "--cors-origin http://localhost:3000" in r.json()["error"]["message"]
    assert "access-control-allow-origin" not in client.options("/v1/models").headers
    r = post(client, {"messages": [_user("x" * 3000)]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = client.post("/v1/chat/completions", content=iter([b'{"messages": [', b" " * 2500, b"]}"]))
    assert chunked.status_code == 413  # no Content-Length: cut off while reading
    cors = TestClient(create_app(model, tok, cors_origins=["http://localhost:3000"], **kw))
    r = post(cors, body, headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    pre = cors.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                         "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    hosts = TestClient(create_app(model, tok, allowed_hosts=("127.0.0.1", "localhost"), **kw))
    assert hosts.get("/health").status_code == 403  # TestClient's Host is "testserver"
    assert hosts.get("/health", headers={"Host": "localhost:8000"}).status_code == 200


# --- many requests at once ------------------------------------------------------------------------


class Gated:
    """A chat double: each reply is `n` pieces; a piece waits for `gate` and records (name, i) in `log`."""

    def __init__(self, n=4):
        self.n, self.gate, self.log = n, threading.Event(), []

    def prompt_ids(self, messages):
        return [1]

    def stream(self, messages, **kw):
        name = messages[-1]["content"]
        for i in range(self.n):
            self.gate.wait(30)
            time.sleep(0.01)  # inside the model lock: another conversation waits its turn
            self.log.append((name, i))
            yield f"{name}{i} "


def test_concurrency_limit_is_503_with_retry_after(tiny_base_env):
    chat = Gated()
    with serve_in_thread(create_app(chat=chat, max_concurrent=1)) as url:
        results = {}

        def first():
            results["a"] = httpx.post(url + "/v1/chat/completions", json={"messages": [_user("a")]}, timeout=60)
        t = threading.Thread(target=first)
        t.start()
        deadline = time.time() + 20
        while httpx.get(url + "/health", timeout=5).json()["active"] == 0:
            assert time.time() < deadline
            time.sleep(0.02)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [_user("b")]}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_error" and "--max-concurrent" in r.json()["error"]["message"]
        chat.gate.set()
        t.join(30)
        assert results["a"].json()["choices"][0]["message"]["content"] == "a0 a1 a2 a3 "
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [_user("b")]}, timeout=30)
        assert r.status_code == 200


def test_two_conversations_interleave_token_by_token(tiny_base_env):
    chat = Gated(n=6)
    with serve_in_thread(create_app(chat=chat, max_concurrent=4)) as url:
        replies = {}

        def ask(name):
            replies[name] = httpx.post(url + "/v1/chat/completions", json={"messages": [_user(name)]}, timeout=60)
        threads = [threading.Thread(target=ask, args=(n,)) for n in "ab"]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while httpx.get(url + "/health", timeout=5).json()["active"] < 2:
            assert time.time() < deadline
            time.sleep(0.02)
        chat.gate.set()
        for t in threads:
            t.join(30)
    assert {n: r.json()["choices"][0]["message"]["content"] for n, r in replies.items()} == {
        "a": "a0 a1 a2 a3 a4 a5 ", "b": "b0 b1 b2 b3 b4 b5 "}
    order = [name for name, _ in chat.log]
    switches = sum(x != y for x, y in zip(order, order[1:]))
    assert switches >= 8, f"the replies did not interleave: {order}"  # one after the other would switch once


def test_fair_lock_serves_waiters_in_arrival_order():
    lock, order = FairLock(), []
    lock.acquire()

    def waiter(i):
        with lock:
            order.append(i)
    threads = []
    for i in range(5):
        threads.append(threading.Thread(target=waiter, args=(i,)))
        threads[-1].start()
        time.sleep(0.05)  # let waiter i take its ticket before i + 1
    assert lock.locked()
    lock.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4] and not lock.locked()
