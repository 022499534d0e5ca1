"""MegaContext memory in chat_cli and chat_web: prompts far past the budget, persistence across processes
and app instances, /ingest, conversation ids, and the errors a user can cause."""
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from fastapi.testclient import TestClient

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet
from megacontext.lensnet import LensNet
from megacontext.reranker import Reranker
from megacontext.runtime import MCSession
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import get_tokenizer
from chat_server import chunks_text, sse_data
from scripts.chat_cli import MemoryChat, document_messages, ingest_document, interactive
from scripts.chat_web import Limits, create_app
from test_runtime import text_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 48


def tiny_cfg():
    return MCConfig(block_size=4, max_level=4, budget=BUDGET, tail_tokens=8, lens_dim=32, lens_heads=4, tau=0.1)


def tiny_nets(tok, seed=0):
    """Depth-1 GPT + GistNet + LensNet + reranker with non-trivial weights. The stop tokens' lm_head rows are
    zeroed (logit 0 while the best of ~500 others is positive), so greedy replies are exactly
    max_tokens long and never empty."""
    torch.manual_seed(seed)
    cfg = tiny_cfg()
    gpt = GPT(config_from_depth(1, tok.get_vocab_size(), 128, aspect_ratio=32, head_dim=16))
    gpt.init_weights()
    gistnet, lensnet = GistNet(gpt.config.n_embd, cfg, gpt.config.n_head), LensNet(gpt.config.n_embd, cfg)
    with torch.no_grad():
        for module in (gpt, gistnet):  # nanochat zero-inits residual projections (and GistNet its head)
            for name, p in module.named_parameters():
                if name.endswith("c_proj.weight") or name == "head.weight":
                    p.uniform_(-0.3, 0.3)
        lensnet.key.weight.mul_(4.0)  # strong enough scores that LensNet asks for edits
        for name in ("<|assistant_end|>", "<|bos|>"):
            gpt.lm_head.weight[tok.encode_special(name)] = 0.0
    return gpt.eval(), gistnet.eval(), lensnet.eval(), Reranker(gpt.config.n_embd, cfg).eval()


def write_mc_checkpoint(base, nets, step=0):
    from nanochat.checkpoint_manager import save_checkpoint
    gpt, gistnet, lensnet, reranker = nets
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", "d1"), step,
                    {"gpt": gpt.state_dict(), "gistnet": gistnet.state_dict(), "lensnet": lensnet.state_dict(),
                     "reranker": reranker.state_dict()},
                    None, {"model_config": asdict(gpt.config), "step": step, "mc_config": tiny_cfg().to_dict()})


def session(tok, nets, memory_dir=None):
    gpt, gistnet, lensnet, reranker = nets
    return MCSession(gpt, gistnet, lensnet, tok, tiny_cfg(), memory_dir=memory_dir, device="cpu", reranker=reranker)


def memory_chat(tok, nets, memory_dir=None):
    return MemoryChat(session(tok, nets, memory_dir))


def reference(tok, nets, turns, max_tokens, memory_dir=None):
    """The greedy replies of a fresh MemoryChat to a list of user messages (one request per message)."""
    chat = memory_chat(tok, nets, memory_dir)
    out = ["".join(chat.stream([{"role": "user", "content": t}], temperature=0.0, max_tokens=max_tokens))
           for t in turns]
    chat.close()
    return out


def reference_after_document(tok, nets, text, name, questions, max_tokens):
    """The greedy replies of a fresh MemoryChat that read a document (ingest_document, as the CLI's /ingest and the
    server's document route do) and was then asked `questions`, one request each."""
    chat = memory_chat(tok, nets)
    ingest_document(chat, text, name)
    out = ["".join(chat.stream([{"role": "user", "content": q}], temperature=0.0, max_tokens=max_tokens))
           for q in questions]
    chat.close()
    return out


def document_tokens(tok, text, name):
    """Tokens a document adds to a memory that holds something already: its two rendered turns."""
    user, ack = document_messages(text, name)
    return len(tok.render_turn("user", user["content"])) + len(tok.render_turn("assistant", ack["content"]))


def run_cli(base, *args, stdin=None):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", "--temperature", "0",
                           *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=180)


def stats_lines(text):
    return [json.loads(line.split("stats: ", 1)[1]) for line in text.splitlines() if "stats: " in line]


# --- chat_cli --------------------------------------------------------------------------------


def test_cli_answers_a_prompt_20x_the_budget(tiny_base_env, tiny_docs):
    tok = get_tokenizer()
    nets = tiny_nets(tok)
    write_mc_checkpoint(tiny_base_env, nets)
    prompt = text_of(20 * BUDGET, tok, tiny_docs)
    assert len(tok.encode(prompt)) >= 20 * BUDGET
    out = run_cli(tiny_base_env, "-p", prompt, "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    expected = reference(tok, nets, [prompt], 8)[0]
    assert len(tok.encode(expected)) >= 4  # an answer, not an empty line
    assert out.stdout == expected + "\n"


def test_cli_memory_persists_across_processes(tiny_base_env, tiny_docs, tmp_path):
    tok = get_tokenizer()
    nets = tiny_nets(tok)
    write_mc_checkpoint(tiny_base_env, nets)
    mem = str(tmp_path / "mem")
    doc = tmp_path / "doc.txt"
    doc.write_text(text_of(4 * BUDGET, tok, tiny_docs))
    # process 1: a document far past the budget and a question, into a new memory
    first = run_cli(tiny_base_env, "--memory", mem, "--ingest", str(doc), "-p", "What is the key?", "--max-tokens", "6")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()
    # process 2: reopens the memory (no --source: the one it recorded), sees it, adds a turn
    second = run_cli(tiny_base_env, "--memory", mem, "--max-tokens", "5", stdin="/stats\nAnd the door?\n/stats\n")
    assert second.returncode == 0, second.stderr
    before, after = stats_lines(second.stdout)
    text = doc.read_text()
    question = tok.render_turn("user", "What is the key?")
    n1 = 1 + document_tokens(tok, text, "doc.txt") + len(question) + 1 + 6 + 1  # bos, ..., assistant_start, reply, end
    assert before["num_tokens"] == n1 and before["turns"] == 4  # the document, its acknowledgement, the exchange
    n2 = n1 + len(tok.render_turn("user", "And the door?")) + 1 + 5 + 1
    assert after["num_tokens"] == n2 and after["turns"] == 6
    assert after["wc_cost"] <= BUDGET and after["refocus_count"] > before["refocus_count"]
    # the memory holds exactly the document and the two exchanges, and both replies as the processes printed them
    s = session(tok, nets, mem)
    assert s.num_tokens == n2
    ids = s.tree.tokens(0, s.num_tokens).tolist()
    s.close()
    sp = tok.encode_special
    user_turns = [i for i, t in enumerate(ids) if t == sp("<|user_start|>")]
    assert len(user_turns) == 3 and ids.count(sp("<|assistant_end|>")) == 3
    pasted = document_messages(text, "doc.txt")[0]["content"]
    assert tok.decode(ids[2:2 + len(tok.encode(pasted))]) == pasted and text.strip() in pasted
    assert tok.decode(ids[n1 - 7:n1 - 1]) == first.stdout.rstrip("\n")
    reply2 = second.stdout.split("Assistant: ")[1].split("\n")[0]
    assert tok.decode(ids[n2 - 6:n2 - 1]) == reply2
    # and the answers are the ones a single in-process conversation gives
    assert reference_after_document(tok, nets, text, "doc.txt", ["What is the key?"], 6)[0] == first.stdout.rstrip("\n")


def test_cli_memory_from_a_different_model_is_one_line_error(tiny_base_env, tmp_path):
    tok = get_tokenizer()
    write_mc_checkpoint(tiny_base_env, tiny_nets(tok, seed=0))
    mem = str(tmp_path / "mem")
    s = MCSession.load(source="sft", device="cpu", memory_dir=mem)
    s.ingest_text("the king and the queen")
    s.save()
    s.close()
    write_mc_checkpoint(tiny_base_env, tiny_nets(tok, seed=1))  # the checkpoint is replaced by another model
    out = run_cli(tiny_base_env, "--memory", mem, "-p", "hi")
    assert out.returncode == 2
    assert out.stderr.startswith("error: memory ") and "different model" in out.stderr
    assert out.stderr.count("\n") == 1


def test_interactive_ingest_and_stats(tiny_base_env, tiny_docs, tmp_path):
    tok = get_tokenizer()
    nets = tiny_nets(tok)
    chat = memory_chat(tok, nets)
    text = text_of(3 * BUDGET, tok, tiny_docs)
    doc = tmp_path / "notes.txt"
    doc.write_text(text)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = io.StringIO()
    inp = io.StringIO(f"/ingest {doc} Who has the key?\n/stats\n/ingest {tmp_path}/missing.txt\n/ingest {empty}\n"
                      f"/ingest\nclear\n/stats\nquit\n")
    interactive(chat, {"temperature": 0.0, "max_tokens": 7}, inp=inp, out=out)
    lines = out.getvalue()
    assert "error: cannot read" in lines and "is empty: nothing to ingest" in lines and "usage: /ingest" in lines
    (st, cleared) = stats_lines(lines)
    assert f"(read {doc} into the conversation)" in lines
    n = 1 + document_tokens(tok, text, "notes.txt") + len(tok.render_turn("user", "Who has the key?")) + 1 + 7 + 1
    assert st["num_tokens"] == n and st["turns"] == 4
    assert st["wc_cost"] <= BUDGET and st["memory_dir"] is None
    assert cleared["num_tokens"] == 0 and cleared["turns"] == 0  # clear: a fresh in-RAM memory
    answer = lines.split("Assistant: ")[1].split("\n")[0]
    assert answer == reference_after_document(tok, nets, text, "notes.txt", ["Who has the key?"], 7)[0] and answer


def test_ingest_without_memory_puts_the_document_in_the_transcript(tiny_base_env, tmp_path):
    """A plain GPT has no memory: ingest_document adds the same two messages to the transcript it reads."""
    from nanochat.engine import Engine
    from scripts.chat_cli import EngineChat
    from test_chat_web import tiny_model
    tok = get_tokenizer()
    model = tiny_model(tok)
    doc = tmp_path / "note.txt"
    doc.write_text("The key is under the mat.")
    out = io.StringIO()
    messages = interactive(EngineChat(model, tok), {"temperature": 0.0, "max_tokens": 5}, out=out,
                           inp=io.StringIO(f"/ingest {doc} Where is the key?\nquit\n"))
    expected_turns = document_messages("The key is under the mat.", "note.txt") + [
        {"role": "user", "content": "Where is the key?"}]
    assert messages[:3] == expected_turns and messages[3]["role"] == "assistant"
    prompt = tok.render_for_completion({"messages": expected_turns})
    results, _ = Engine(model, tok).generate_batch(prompt, max_tokens=5, temperature=0.0)
    assert messages[3]["content"] == tok.decode(results[0][len(prompt):])


def test_memory_chat_sees_only_unseen_messages_and_rejects_bad_input(tiny_base_env):
    tok = get_tokenizer()
    chat = memory_chat(tok, tiny_nets(tok))
    a1 = "".join(chat.stream([{"role": "user", "content": "hello"}], temperature=0.0, max_tokens=3))
    n = chat.session.num_tokens
    # the whole transcript again: only the new user turn is read
    transcript = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": a1},
                  {"role": "user", "content": "more"}]
    assert chat.prompt_ids(transcript) == [tok.encode_special("<|user_start|>")] + tok.encode("more") + \
        [tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
    list(chat.stream(transcript, temperature=0.0, max_tokens=3))
    assert chat.session.num_tokens == n + 1 + len(tok.encode("more")) + 1 + 1 + 3 + 1 and chat.turns == 4
    for bad, needle in (([{"role": "user", "content": "   "}], "empty"),
                        ([{"role": "assistant", "content": "x"}], "alternate"),
                        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate")):
        with pytest.raises(ValueError, match=needle):
            list(chat.stream(bad))
    assert chat.session.num_tokens == n + 1 + len(tok.encode("more")) + 1 + 1 + 3 + 1  # nothing was appended


# --- chat_web --------------------------------------------------------------------------------


def ask(client, messages, cid=None, max_tokens=6):
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    if cid is not None:
        body["conversation_id"] = cid
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    events = sse_data(r.text.splitlines())
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", events
    return chunks_text(events[:-1])


LIMITS = Limits(max_message_chars=20000)


def test_web_long_prompt_and_memory_across_app_instances(tiny_base_env, tiny_docs, tmp_path):
    tok = get_tokenizer()
    root = str(tmp_path / "chat_memory")
    prompt = text_of(20 * BUDGET, tok, tiny_docs)
    app = create_app(chat=memory_chat(tok, tiny_nets(tok)), limits=LIMITS, memory_root=root)
    client = TestClient(app)
    assert client.get("/health").json()["memory"] is True
    a1 = ask(client, [{"role": "user", "content": prompt}], cid="conv-1")
    expected = reference(tok, tiny_nets(tok), [prompt, "And then?"], 6, memory_dir=str(tmp_path / "ref"))
    assert a1 == expected[0] and a1
    assert ask(client, [{"role": "user", "content": prompt}]) == a1  # no id: a fresh in-RAM memory, same answer
    n1 = client.get("/v1/conversations/conv-1").json()["stats"]["num_tokens"]
    assert n1 > 20 * BUDGET and os.path.isfile(os.path.join(root, "conv-1", "session.json"))
    app.state.memories.close()
    # a new server (new nets object, same weights) continues the conversation from disk
    client2 = TestClient(create_app(chat=memory_chat(tok, tiny_nets(tok)), limits=LIMITS, memory_root=root))
    transcript = [{"role": "user", "content": prompt}, {"role": "assistant", "content": a1},
                  {"role": "user", "content": "And then?"}]
    a2 = ask(client2, transcript, cid="conv-1")
    assert a2 == expected[1]  # the same as one uninterrupted conversation
    st = client2.get("/v1/conversations/conv-1").json()["stats"]
    assert st["num_tokens"] == n1 + 1 + len(tok.encode("And then?")) + 1 + 1 + 6 + 1 and st["turns"] == 4
    assert st["wc_cost"] <= BUDGET and "memory_dir" not in st
    assert client2.get("/v1/conversations/nope").json()["error"]["code"] == "conversation_not_found"


@pytest.mark.parametrize("cid", ["../etc", "", "a" * 65, 5, "a b", "caf\u00e9", ["x"], "x/y"])
def test_web_conversation_id_is_validated(tiny_base_env, tmp_path, cid):
    tok = get_tokenizer()
    app = create_app(chat=memory_chat(tok, tiny_nets(tok)), limits=LIMITS, memory_root=str(tmp_path / "m"))
    client = TestClient(app)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "conversation_id": cid})
    assert r.status_code == 400 and "conversation_id must be" in r.json()["error"]["message"]
    r = client.post("/v1/conversations", json={"id": cid})
    assert r.status_code == 400 and r.json()["error"]["param"] == "conversation_id"
    assert not os.path.exists(tmp_path / "m")  # nothing was created
    for path in ("/v1/conversations/a%20b", "/v1/conversations/..%2Fetc/focus", "/v1/conversations/a.b/events"):
        assert client.get(path).status_code in (400, 404)
    assert client.delete("/v1/conversations/a%20b").status_code == 400


def test_web_memory_of_another_model_is_a_clear_error(tiny_base_env, tmp_path):
    tok = get_tokenizer()
    root = str(tmp_path / "m")
    client = TestClient(create_app(chat=memory_chat(tok, tiny_nets(tok, seed=0)), limits=LIMITS, memory_root=root))
    ask(client, [{"role": "user", "content": "hi"}], cid="c1", max_tokens=2)
    client.app.state.memories.close()
    other = TestClient(create_app(chat=memory_chat(tok, tiny_nets(tok, seed=1)), limits=LIMITS, memory_root=root))
    r = other.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "conversation_id": "c1"})
    assert r.status_code == 409 and "different model" in r.json()["error"]["message"]
    ask(other, [{"role": "user", "content": "hi"}], cid="c2", max_tokens=2)  # other conversations still work
