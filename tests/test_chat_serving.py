"""The memory behind the server (a tiny random MegaContext model, in-process): conversations created, listed and
deleted; documents uploaded with progress and a size limit, then a question answered from the memory; the focus
map and its event stream; and conversations answered at once without touching each other's memory."""
import json
import os
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from chat_server import chunks_text, serve_in_thread, sse_data
from nanochat.tokenizer import get_tokenizer
from scripts.chat_cli import document_messages
from scripts.chat_web import Limits, create_app
from test_chat_memory import BUDGET, memory_chat, reference, reference_after_document, tiny_nets
from test_runtime import text_of

LIMITS = Limits(max_message_chars=20000, max_document_bytes=6000)


@pytest.fixture
def app_and_nets(tiny_base_env, tmp_path):
    tok = get_tokenizer()
    nets = tiny_nets(tok)
    app = create_app(chat=memory_chat(tok, nets), limits=LIMITS, memory_root=str(tmp_path / "memories"),
                     doc_chunk_tokens=64, source="test")
    yield app, tok, nets
    app.state.memories.close()


def check_map(m, stats=None):
    """A focus map's entries tile the history in order, raw blocks carry their text, gists none, within budget."""
    assert m["type"] == "focus" and m["wc_cost"] <= m["budget"] == BUDGET
    pos = 0
    for (level, a, b), text in zip(m["entries"], m["texts"]):
        assert a == pos and b > a and (text is None) == (level > 0)
        assert b - a == (m["block_size"] ** level if level else b - a) and (level > 0 or b - a <= m["block_size"])
        pos = b
    assert pos == m["num_tokens"] and len(m["texts"]) == len(m["entries"])
    if stats is not None:
        assert (len(m["entries"]), m["num_tokens"], m["wc_cost"]) == (stats["wc_entries"], stats["num_tokens"],
                                                                     stats["wc_cost"])


def ask(client, cid, text, max_tokens=6):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "temperature": 0,
                                                  "max_tokens": max_tokens, "conversation_id": cid})
    assert r.status_code == 200, r.text
    return r.json()


def test_document_upload_then_a_question_answered_from_memory(app_and_nets, tiny_docs):
    app, tok, nets = app_and_nets
    client = TestClient(app)
    assert client.post("/v1/conversations", json={"id": "docs"}).status_code == 201
    empty = client.get("/v1/conversations/docs/focus").json()
    assert empty["num_tokens"] == 0 and empty["entries"] == []
    text = text_of(6 * BUDGET, tok, tiny_docs)
    assert len(text.encode()) < LIMITS.max_document_bytes
    r = client.post("/v1/conversations/docs/documents", files={"file": ("../../etc/notes.txt", text.encode(),
                                                                         "text/plain")})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_data(r.text.splitlines())
    progress, done = events[:-1], events[-1]
    total = 1 + sum(len(tok.render_turn(m["role"], m["content"])) for m in document_messages(text, "notes.txt"))
    assert all(e["type"] == "progress" and e["total"] == total for e in progress)
    assert [e["ingested"] for e in progress][0] == 0 and progress[-1]["ingested"] == total and len(progress) >= 4
    assert [e["ingested"] for e in progress] == sorted(e["ingested"] for e in progress)
    assert done["type"] == "done" and done["messages"] == document_messages(text, "notes.txt")  # the name, no path
    assert done["stats"]["num_tokens"] == total and done["stats"]["turns"] == 2 and "memory_dir" not in done["stats"]
    # the map shows the grown memory: far more history than budget, gists and raw blocks mixed
    m = client.get("/v1/conversations/docs/focus").json()
    check_map(m, done["stats"])
    assert m["num_tokens"] == total > 4 * BUDGET and {0, 1} <= {e[0] for e in m["entries"]}
    # the next question is answered from that memory, as the CLI's /ingest would have it
    out = ask(client, "docs", "Who has the key?", max_tokens=7)
    expected = reference_after_document(tok, nets, text, "notes.txt", ["Who has the key?"], 7)[0]
    assert out["choices"][0]["message"]["content"] == expected
    assert expected != reference(tok, nets, ["Who has the key?"], 7)[0]  # the document changed the answer
    q = len(tok.render_turn("user", "Who has the key?")) + 1
    assert out["usage"] == {"prompt_tokens": q, "completion_tokens": 7, "total_tokens": q + 7}
    after = client.get("/v1/conversations/docs").json()["stats"]
    assert after["num_tokens"] == total + q + 7 + 1 and after["turns"] == 4
    check_map(client.get("/v1/conversations/docs/focus").json(), after)
    # pasted text (JSON) goes the same way
    r = client.post("/v1/conversations/docs/documents", json={"text": "The gate code is 4417.", "name": "gate"})
    assert sse_data(r.text.splitlines())[-1]["messages"][0]["content"].startswith("Here is a document, gate:")


def test_document_limits_and_errors(app_and_nets):
    app, _, _ = app_and_nets
    client = TestClient(app)
    client.post("/v1/conversations", json={"id": "d"})
    url = "/v1/conversations/d/documents"
    r = client.post(url, files={"file": ("big.txt", b"x" * 6001, "text/plain")})
    err = r.json()["error"]
    assert r.status_code == 413 and err["code"] == "document_too_large" and "6001 bytes; the limit is 6000" in \
        err["message"]
    r = client.post(url, json={"text": "\u00e9" * 3001})  # 6002 bytes as UTF-8
    assert r.status_code == 413
    r = client.post(url, content=b"x" * 100000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"  # refused before reading
    for kw, status, needle in [
            (dict(files={"file": ("a.bin", b"\x00\x01", "application/octet-stream")}), 400, "binary"),
            (dict(files={"file": ("a.txt", b"  \n", "text/plain")}), 400, "empty"),
            (dict(files={"other": ("a.txt", b"hi", "text/plain")}), 400, 'field "file"'),
            (dict(content=b"hi", headers={"Content-Type": "text/plain"}), 415, "multipart/form-data"),
            (dict(json={"txt": "hi"}), 400, '{"text"')]:
        r = client.post(url, **kw)
        assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    r = client.post("/v1/conversations/nope/documents", json={"text": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found"
    assert client.get("/v1/conversations/d").json()["stats"]["num_tokens"] == 0  # nothing went in


def test_conversations_create_list_delete(app_and_nets, tmp_path):
    app, _, _ = app_and_nets
    client = TestClient(app)
    r = client.post("/v1/conversations", json={"id": "alpha"})
    assert r.status_code == 201 and r.json()["id"] == "alpha" and r.json()["stats"]["num_tokens"] == 0
    fresh = client.post("/v1/conversations").json()["id"]  # no body: a random id
    assert len(fresh) == 32 and client.post("/v1/conversations", json={"id": "alpha"}).status_code == 409
    ask(client, "beta", "hi", max_tokens=2)  # a chat completion creates its conversation on first use
    assert sorted(c["id"] for c in client.get("/v1/conversations").json()["data"]) == sorted(["alpha", "beta", fresh])
    os.makedirs(tmp_path / "memories" / "not-a-memory")  # a directory without session.json is not listed
    assert len(client.get("/v1/conversations").json()["data"]) == 3
    r = client.delete("/v1/conversations/beta")
    assert r.json() == {"id": "beta", "object": "conversation.deleted", "deleted": True}
    assert not os.path.exists(tmp_path / "memories" / "beta")
    assert client.delete("/v1/conversations/beta").status_code == 404
    assert client.get("/v1/conversations/beta/focus").status_code == 404
    assert "beta" not in [c["id"] for c in client.get("/v1/conversations").json()["data"]]
    assert ask(client, "beta", "hi", max_tokens=2)["usage"]["prompt_tokens"] == 1 + len(
        get_tokenizer().render_turn("user", "hi")) + 1  # a new, empty memory under the old id


def wait_for(condition, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def read_events(url, cid, out, stop):
    """Collect the focus-map events of a conversation until `stop` is set or the stream ends."""
    with httpx.stream("GET", f"{url}/v1/conversations/{cid}/events", timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
                if out[-1]["type"] == "deleted" or stop.is_set():
                    return


def test_focus_events_follow_every_refocus_and_end_on_delete(app_and_nets, tiny_docs):
    app, tok, _ = app_and_nets
    with serve_in_thread(app) as url:
        httpx.post(url + "/v1/conversations", json={"id": "ev"})
        events, stop = [], threading.Event()
        reader = threading.Thread(target=read_events, args=(url, "ev", events, stop))
        reader.start()
        wait_for(lambda: events)
        assert events[0]["num_tokens"] == 0  # the map as it is on subscribing
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": text_of(3 * BUDGET, tok, tiny_docs)}], "temperature": 0,
            "max_tokens": 12, "conversation_id": "ev"})
        assert r.status_code == 200
        final = httpx.get(url + "/v1/conversations/ev/focus").json()
        wait_for(lambda: events[-1] == final)
        maps = events[1:]
        counts = [m["refocus_count"] for m in maps]
        # 12 reply tokens in blocks of 4 refocus at least 3 times while the reply is written
        assert len(maps) >= 4 and counts == sorted(counts) and counts[-1] >= counts[0] + 3
        for m in maps:
            check_map(m)
        assert httpx.delete(url + "/v1/conversations/ev").status_code == 200
        reader.join(20)
        assert not reader.is_alive() and events[-1] == {"type": "deleted", "conversation_id": "ev"}


def test_conversations_at_once_do_not_touch_each_other(app_and_nets):
    """Four conversations and two requests into one of them, all at once: every reply and memory is what it is
    alone, and the two requests into one conversation take turns (its turn lock)."""
    app, tok, nets = app_and_nets
    words = ["key", "door", "crown", "sword"]
    questions = {f"c{i}": f"Conversation {i}: where is the {w}?" for i, w in enumerate(words)}
    replies, errors = {}, []
    with serve_in_thread(app) as url:
        def ask_one(cid, text, slot):
            try:
                r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                    "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 8,
                    "conversation_id": cid, "stream": True})
                replies[slot] = chunks_text(sse_data(r.iter_lines()))
            except Exception as e:  # reported below
                errors.append(e)
        jobs = [(cid, q, cid) for cid, q in questions.items()] + [("c0", "And then?", "c0-second")]
        threads = [threading.Thread(target=ask_one, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        stats = {cid: httpx.get(f"{url}/v1/conversations/{cid}").json()["stats"] for cid in questions}
    for cid, q in questions.items():
        if cid != "c0":
            assert replies[cid] == reference(tok, nets, [q], 8)[0]
            assert stats[cid]["num_tokens"] == 1 + len(tok.render_turn("user", q)) + 1 + 8 + 1
    # c0's two requests ran one after the other, in either order
    first, second = questions["c0"], "And then?"
    orders = [reference(tok, nets, [first, second], 8), reference(tok, nets, [second, first], 8)[::-1]]
    assert [replies["c0"], replies["c0-second"]] in orders and stats["c0"]["turns"] == 4


def test_usage_and_finish_reason_are_read_from_the_memory_and_the_engine(tiny_base_env):
    """A reply that the model ends counts its tokens up to <|assistant_end|>; one cut at max_tokens counts max_tokens
    (the memory also holds the closing token the cut added). An EngineChat's engine steps are counted."""
    import types

    import torch

    from nanochat.server.turns import Meter, _CountingEngine
    tok = get_tokenizer()
    end = tok.encode_special("<|assistant_end|>")

    for reply, expected in (([40, 41, end], (2, 3, True)), ([40, 41, 42, 43, end], (2, 4, False))):
        ids = torch.tensor([7, 1, 2] + reply)  # history, the prompt's 2 tokens, the reply
        session = types.SimpleNamespace(num_tokens=1, tree=types.SimpleNamespace(tokens=lambda a, b: ids[a:b]))
        meter = Meter(types.SimpleNamespace(session=session, tokenizer=tok), prompt=[1, 2], max_tokens=4)
        session.num_tokens = len(ids)  # the turn has run
        assert meter.result("") == expected
    engine = types.SimpleNamespace(generate=lambda tokens, **kw: iter([([5], [1]), ([6], [1]), ([end], [1])]))
    counting = _CountingEngine(engine, {end})
    assert list(counting.generate([1, 2, 3])) and (counting.prompt_tokens, counting.steps, counting.stopped) == (
        3, 3, True)
