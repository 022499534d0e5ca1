"""scripts.chat_web: the page, health, SSE streaming equal to the engine, request limits, a real server."""
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import get_tokenizer
from scripts.chat_web import Defaults, Limits, create_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def parse_sse(lines):
    """The JSON payloads of `data: ...` lines."""
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


@pytest.fixture
def served(tiny_base_env):
    tok = get_tokenizer()
    model = tiny_model(tok)
    limits = Limits(max_messages=5, max_message_chars=200, max_total_tokens=60, max_max_tokens=16)
    client = TestClient(create_app(model, tok, limits=limits, defaults=Defaults(max_tokens=8), source="test"))
    return client, model, tok


def test_index_and_health(served):
    client, _, _ = served
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>nanochat</title>" in r.text and "/chat/completions" in r.text
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["source"] == "test" and h["limits"]["max_messages"] == 5


def test_stream_matches_engine(served):
    client, model, tok = served
    messages = [{"role": "user", "content": "Tell me about the queen."},
                {"role": "assistant", "content": "She lives in the castle."},
                {"role": "user", "content": "And the king?"}]
    with client.stream("POST", "/chat/completions",
                       json={"messages": messages, "temperature": 0, "max_tokens": 9}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.iter_lines())
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token"} for e in events[:-1]) and len(events) > 1
    assert "".join(e["token"] for e in events[:-1]) == greedy_reply(model, tok, messages, 9)


def test_sampling_params_accepted(served):
    client, _, _ = served
    r = client.post("/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                               "temperature": 1.5, "top_k": 5, "max_tokens": 3})
    events = parse_sse(r.text.splitlines())
    assert r.status_code == 200 and events[-1] == {"done": True}


def _user(text="hello"):
    return {"role": "user", "content": text}


@pytest.mark.parametrize("body, needle", [
    ({"messages": []}, "non-empty list"),
    ({}, "non-empty list"),
    ([1, 2], "JSON object"),
    ({"messages": [_user(), {"role": "assistant", "content": "x"}] * 2 + [_user(), _user()]}, "too many messages"),
    ({"messages": [_user("x" * 201)]}, "too long: 201 characters"),
    ({"messages": [_user("1234567890" * 19)]}, "the conversation is too long"),  # ~100 tokens
    ({"messages": [_user()], "temperature": 2.5}, "temperature must be between"),
    ({"messages": [_user()], "temperature": -0.1}, "temperature must be between"),
    ({"messages": [_user()], "temperature": "hot"}, "temperature must be a number"),
    ({"messages": [_user()], "top_k": 201}, "top_k must be between"),
    ({"messages": [_user()], "top_k": 2.5}, "top_k must be an integer"),
    ({"messages": [_user()], "max_tokens": 0}, "max_tokens must be between"),
    ({"messages": [_user()], "max_tokens": 17}, "max_tokens must be between"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "has role 'robot'"),
    ({"messages": [{"role": "user"}]}, 'string "role" and "content"'),
    ({"messages": [_user("   ")]}, "message 0 is empty"),
    ({"messages": [_user(), {"role": "assistant", "content": "x"}]}, "last message must be from the user"),
    ({"messages": [_user(), _user()]}, "alternate"),
])
def test_limits_rejected_with_clear_json(served, body, needle):
    client, _, _ = served
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 400
    assert needle in r.json()["error"]


def test_defaults_must_fit_the_limits(tiny_base_env):
    tok = get_tokenizer()
    with pytest.raises(ValueError, match="max_tokens must be between"):
        create_app(tiny_model(tok), tok, limits=Limits(max_max_tokens=16))  # default max_tokens 512


def test_invalid_json_rejected(served):
    client, _, _ = served
    r = client.post("/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_generation_error_reported_in_band(tiny_base_env):
    class Broken:
        def prompt_ids(self, messages):
            return [1, 2, 3]

        def stream(self, messages, **kw):
            yield "partial"
            raise RuntimeError("out of memory")
    client = TestClient(create_app(chat=Broken()))
    events = parse_sse(client.post("/chat/completions", json={"messages": [_user()]}).text.splitlines())
    assert events[0] == {"token": "partial"} and "out of memory" in events[1]["error"] and len(events) == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_server(tiny_base_env):
    """Start the real server on a tiny saved checkpoint, chat over HTTP, read the stream."""
    from nanochat.checkpoint_manager import save_checkpoint
    tok = get_tokenizer()
    model = tiny_model(tok, seed=1)
    save_checkpoint(os.path.join(tiny_base_env, "chatsft_checkpoints", "d1"), 3, {"gpt": model.state_dict()},
                    None, {"model_config": asdict(model.config), "step": 3})
    port = _free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": tiny_base_env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--source", "sft", "--device-type", "cpu",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"server exited early:\n{proc.stdout.read()}"
            assert time.time() < deadline, "server did not come up within 120 s"
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        messages = [_user("Is the door open?")]
        with httpx.stream("POST", url + "/chat/completions", timeout=60,
                          json={"messages": messages, "temperature": 0, "max_tokens": 6}) as r:
            assert r.status_code == 200
            events = parse_sse(r.iter_lines())
        assert events[-1] == {"done": True}
        assert "".join(e["token"] for e in events[:-1]) == greedy_reply(model, tok, messages, 6)
        assert "<title>nanochat</title>" in httpx.get(url + "/", timeout=10).text
        r = httpx.post(url + "/chat/completions", json={"messages": [_user()], "top_k": 1000}, timeout=10)
        assert r.status_code == 400 and "top_k" in r.json()["error"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_long_transcript_without_memory_gets_a_notice(tiny_base_env):
    """No MegaContext weights: a transcript past the window is cut to its newest tokens, said in-band."""
    tok = get_tokenizer()
    model = tiny_model(tok)  # sequence_len 64
    client = TestClient(create_app(model, tok, limits=Limits(max_max_tokens=16), defaults=Defaults(max_tokens=8)))
    assert client.get("/health").json()["memory"] is False
    messages = [_user("the river and the castle " * 30)]
    r = client.post("/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 8,
                                               "conversation_id": "abc_DEF-123"})  # valid, unused without memory
    events = parse_sse(r.text.splitlines())
    assert r.status_code == 200 and "keeping the most recent 56" in events[0]["notice"]
    assert events[-1] == {"done": True} and all(set(e) == {"token"} for e in events[1:-1])
    ids = tok.render_for_completion({"messages": messages})
    kept = ids[:1] + ids[-55:]
    results, _ = Engine(model, tok).generate_batch(kept, max_tokens=8, temperature=0.0)
    assert "".join(e["token"] for e in events[1:-1]) == tok.decode(results[0][len(kept):])
    bad = client.post("/chat/completions", json={"messages": messages, "conversation_id": "no/slashes"})
    assert bad.status_code == 400 and "conversation_id must be" in bad.json()["error"]
    assert client.get("/memory/abc").status_code == 404
