"""The official `openai` client against the real server (python -m scripts.chat_web under uvicorn, a tiny random
MegaContext checkpoint, --api-key): completions and streams with and without a conversation memory, the key
enforced, and 16 streaming clients in separate conversations at once, each answered as it would be alone."""
import asyncio
import os
import shutil
import statistics
import time

import httpx
import openai
import pytest

from chat_server import chat_web_process
from nanochat.tokenizer import Tokenizer
from test_chat_memory import reference, tiny_nets, write_mc_checkpoint

KEY = "test-key-123"
MODEL = "nanochat-sft"


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    """(url, tokenizer, nets): one server for the module, on a checkpoint of tiny_nets."""
    base = str(tmp_path_factory.mktemp("openai_base"))
    for sub in ("base_data", "tokenizer"):
        shutil.copytree(os.path.join(tiny_base_dir, sub), os.path.join(base, sub))
    tok = Tokenizer.from_directory(os.path.join(base, "tokenizer"))
    nets = tiny_nets(tok)
    write_mc_checkpoint(base, nets)
    with chat_web_process(base, "--source", "sft", "--max-concurrent", "16", "--max-tokens", "8", key=KEY) as url:
        yield url, tok, nets


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


def memory_stats(url, cid):
    r = httpx.get(f"{url}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["stats"]


def test_completion_and_stream_without_a_conversation(server):
    url, tok, nets = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == [MODEL]
    expected = reference(tok, nets, ["Where is the key?"], 6)[0]
    out = c.chat.completions.create(model=MODEL, messages=user("Where is the key?"), temperature=0, max_tokens=6)
    prompt = 1 + len(tok.render_turn("user", "Where is the key?")) + 1  # bos, the turn, <|assistant_start|>
    assert out.object == "chat.completion" and out.choices[0].message.content == expected and expected
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.role == "assistant"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (prompt, 6, prompt + 6)
    stream = c.chat.completions.create(model=MODEL, messages=user("Where is the key?"), temperature=0, max_tokens=6,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    # top_k=1 (an extra field) is greedy whatever the temperature; a stop string ends the reply early
    greedy = c.chat.completions.create(model=MODEL, messages=user("Where is the key?"), temperature=1.5,
                                       max_tokens=6, extra_body={"top_k": 1})
    assert greedy.choices[0].message.content == expected
    stop = expected[3:5]
    cut = c.chat.completions.create(model=MODEL, messages=user("Where is the key?"), temperature=0, max_tokens=6,
                                    stop=[stop])
    assert cut.choices[0].message.content == expected[:expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="temperature must be between"):
        c.chat.completions.create(model=MODEL, messages=user("hi"), temperature=3)


def test_completion_and_stream_in_a_conversation(server):
    url, tok, nets = server
    c = client(url)
    first = c.chat.completions.create(model=MODEL, messages=user("Remember the river."), temperature=0,
                                      max_tokens=6, extra_body={"conversation_id": "oa-1"})
    # the memory holds the first exchange: the stream sends only the new message
    stream = c.chat.completions.create(model=MODEL, messages=user("What did I ask?"), temperature=0, max_tokens=5,
                                       stream=True, extra_body={"conversation_id": "oa-1"})
    second = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    expected = reference(tok, nets, ["Remember the river.", "What did I ask?"], 6)
    assert first.choices[0].message.content == expected[0]
    alone = reference(tok, nets, ["What did I ask?"], 5)[0]
    with_history = [first.choices[0].message.content, second]
    assert with_history[1] != alone  # answered from the memory, not from the message alone
    st = memory_stats(url, "oa-1")
    n = (1 + len(tok.render_turn("user", "Remember the river.")) + 1 + 6 + 1
         + len(tok.render_turn("user", "What did I ask?")) + 1 + 5 + 1)
    assert st["num_tokens"] == n and st["turns"] == 4 and st["wc_cost"] <= st["budget"]


def test_api_key_enforced(server):
    url, _, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    r = httpx.post(url + "/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2}, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(url + "/", timeout=30).status_code == 200  # the page itself; it asks for the key


QUESTIONS = [f"Conversation {i}: what about the {w}?" for i, w in enumerate(
    "key door garden letter crown sword river castle winter summer light shadow memory number king queen".split())]


def test_sixteen_streaming_clients_at_once(server):
    """16 conversations stream at once (the server's --max-concurrent 16): no error, and every reply and memory
    is what the conversation gives alone (sequential greedy runs in this process). Prints time to first token."""
    url, tok, nets = server

    async def one(c, i):
        t0 = time.perf_counter()
        stream = await c.chat.completions.create(model=MODEL, messages=user(QUESTIONS[i]), temperature=0,
                                                 max_tokens=8, stream=True, extra_body={"conversation_id": f"load-{i}"})
        first, pieces = None, []
        async for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                first = first or time.perf_counter() - t0
                pieces.append(ch.choices[0].delta.content)
        return "".join(pieces), first, time.perf_counter() - t0

    async def everyone():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(16)))
        finally:
            await c.close()
    t0 = time.perf_counter()
    results = asyncio.run(everyone())
    wall = time.perf_counter() - t0
    ttft = sorted(r[1] for r in results)
    p50, p99 = statistics.median(ttft), ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    print(f"\n16 concurrent streams: time to first token p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; "
          f"whole replies p50 {statistics.median(r[2] for r in results) * 1000:.0f} ms; wall {wall:.2f} s")
    for i, (text, first, _) in enumerate(results):
        assert first is not None and text == reference(tok, nets, [QUESTIONS[i]], 8)[0], f"conversation {i}"
        st = memory_stats(url, f"load-{i}")
        assert st["num_tokens"] == 1 + len(tok.render_turn("user", QUESTIONS[i])) + 1 + 8 + 1 and st["turns"] == 2
