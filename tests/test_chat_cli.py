"""scripts.chat_cli: streaming detokenization, replies equal to the engine's, the loop, the CLI."""
import io
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import get_tokenizer
from nanochat.tokenizer import StreamDecoder
from scripts.chat_cli import EngineChat, interactive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(tokenizer, seed=0):
    """A depth-1 random GPT that never emits a stop token under greedy decoding (so replies have
    exactly max_tokens tokens): the stop tokens' lm_head rows are zeroed, so their logit is 0 while
    the best of the ~500 others is positive."""
    torch.manual_seed(seed)
    model = GPT(config_from_depth(1, tokenizer.get_vocab_size(), sequence_len=64))
    model.init_weights()
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model.eval()


def save_tiny_checkpoint(model, source_dir="chatsft_checkpoints", tag="d1", step=5):
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.common import get_base_dir
    path = os.path.join(get_base_dir(), source_dir, tag)
    save_checkpoint(path, step, {"gpt": model.state_dict()}, None,
                    {"model_config": asdict(model.config), "step": step})
    return path


def reference_reply(model, tokenizer, messages, max_tokens):
    """What the engine generates greedily for the conversation, decoded."""
    prompt = tokenizer.render_for_completion({"messages": messages})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return tokenizer.decode(results[0][len(prompt):])


def test_stream_decoder_multibyte(tiny_base_env):
    tok = get_tokenizer()
    text = "café naïve 日本語 🙂 Grüße, ½ done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # the emoji's 4 bytes are split over several byte-level tokens, so some feeds must wait
    assert len(tok.encode("🙂")) > 1 and "" in pieces[:-1]


def test_engine_chat_matches_engine(tiny_base_env):
    tok = get_tokenizer()
    model = tiny_model(tok)
    chat = EngineChat(model, tok)
    messages = [{"role": "user", "content": "What is the river called?"}]
    pieces = list(chat.stream(messages, temperature=0.0, max_tokens=12))
    assert "".join(pieces) == reference_reply(model, tok, messages, 12)
    assert len(tok.encode("".join(pieces))) > 0


def test_engine_chat_stops_at_assistant_end(tiny_base_env):
    tok = get_tokenizer()
    model = tiny_model(tok)
    end = tok.encode_special("<|assistant_end|>")
    # force <|assistant_end|> as the first token: the reply must be empty (the stop token not shown)
    orig_head = model.head

    def head(x, targets=None, loss_reduction="mean"):
        logits = orig_head(x, targets, loss_reduction)
        logits[..., end] = 1e4
        return logits
    model.head = head
    assert list(EngineChat(model, tok).stream([{"role": "user", "content": "hi"}], temperature=0.0)) == []


class RecordingChat:
    """Stands in for EngineChat: records what each turn was asked and answers 'ok N'."""

    def __init__(self):
        self.calls = []

    def stream(self, messages, **kwargs):
        self.calls.append([dict(m) for m in messages])
        yield "ok "
        yield str(len(self.calls))


def test_interactive_loop_clear_and_quit():
    chat = RecordingChat()
    out = io.StringIO()
    inp = io.StringIO("first\n\nsecond\nclear\nthird\nquit\nnever read\n")
    messages = interactive(chat, {}, inp=inp, out=out)
    assert [len(c) for c in chat.calls] == [1, 3, 1]  # the conversation grows, then clear resets it
    assert chat.calls[1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok 1"},
                             {"role": "user", "content": "second"}]
    assert messages == [{"role": "user", "content": "third"}, {"role": "assistant", "content": "ok 3"}]
    text = out.getvalue()
    assert "Assistant: ok 1\n" in text and "(conversation cleared)" in text


def test_interactive_loop_eof():
    chat = RecordingChat()
    assert interactive(chat, {}, inp=io.StringIO("hello\n"), out=io.StringIO())[-1]["content"] == "ok 1"


def _run_cli(base, *args):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def test_cli_prompt_mode_streams_reference_reply(tiny_base_env):
    tok = get_tokenizer()
    model = tiny_model(tok)
    save_tiny_checkpoint(model)
    prompt = "Where is the castle?"
    out = _run_cli(tiny_base_env, "-p", prompt, "--temperature", "0", "--max-tokens", "10", "--device-type", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference_reply(model, tok, [{"role": "user", "content": prompt}], 10) + "\n"


def test_cli_user_errors_are_one_line(tiny_base_env):
    out = _run_cli(tiny_base_env, "-p", "hi", "--device-type", "cpu")  # no checkpoints yet
    assert out.returncode == 2
    assert out.stderr.startswith("error: no sft checkpoints") and out.stderr.count("\n") == 1
    from nanochat.common import UserError
    from scripts.chat_cli import main
    for flags, needle in ((["--temperature", "-1"], "--temperature"), (["--top-k", "-2"], "--top-k"),
                          (["--max-tokens", "0"], "--max-tokens"), (["-p", "  "], "empty")):
        with pytest.raises(UserError, match=needle):
            main(flags)


def test_engine_chat_keeps_the_most_recent_tokens_that_fit(tiny_base_env):
    """A plain GPT has no memory past its window: a longer conversation keeps its newest tokens (BOS
    first), with a notice, and the reply is the engine's reply to exactly those tokens."""
    tok = get_tokenizer()
    model = tiny_model(tok)  # sequence_len 64
    chat = EngineChat(model, tok)
    messages = [{"role": "user", "content": "the king and the queen of the castle by the river " * 20}]
    ids = chat.prompt_ids(messages)
    assert len(ids) > 3 * 64
    notices = []
    pieces = list(chat.stream(messages, temperature=0.0, max_tokens=10, on_notice=notices.append))
    room = 64 - 10
    kept = ids[:1] + ids[-(room - 1):]
    assert chat.fit_window(ids, 10) == (kept, notices[0]) and len(notices) == 1
    assert f"{len(ids)} tokens" in notices[0] and "keeping the most recent 54" in notices[0]
    results, _ = Engine(model, tok).generate_batch(kept, max_tokens=10, temperature=0.0)
    assert "".join(pieces) == tok.decode(results[0][len(kept):])
    # a short conversation is untouched and gives no notice; a long reply still leaves half the window
    assert chat.fit_window(ids[:20], 10) == (ids[:20], None)
    assert len(chat.fit_window(ids, 500)[0]) == 32


def test_cli_long_prompt_without_megacontext_is_answered_with_a_notice(tiny_base_env):
    tok = get_tokenizer()
    model = tiny_model(tok)
    save_tiny_checkpoint(model)
    prompt = "Where is the castle by the river? " * 30
    out = _run_cli(tiny_base_env, "-p", prompt, "--temperature", "0", "--max-tokens", "6", "--device-type", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("\n") == 1 and "longer than the model's 64-token window" in out.stderr
    rendered = tok.render_for_completion({"messages": [{"role": "user", "content": prompt}]})
    ids = EngineChat(model, tok).fit_window(rendered, 6)[0]
    results, _ = Engine(model, tok).generate_batch(ids, max_tokens=6, temperature=0.0)
    assert out.stdout == tok.decode(results[0][len(ids):]) + "\n" and out.stdout.strip()


def test_interactive_clear_keeps_a_persistent_memory():
    class Persistent(RecordingChat):
        persistent = True

        class session:
            memory_dir = "/srv/mem"

        def stats(self):
            return {"num_tokens": 7}
    chat = Persistent()
    out = io.StringIO()
    messages = interactive(chat, {}, inp=io.StringIO("first\nclear\n/stats\nsecond\n"), out=out)
    text = out.getvalue()
    assert "persistent memory" in text and "(conversation cleared)" not in text and "Memory: /srv/mem" in text
    assert 'stats: {"num_tokens": 7}' in text
    assert len(messages) == 4  # clear did not drop the transcript
