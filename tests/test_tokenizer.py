"""The BPE tokenizer: training, byte-exact round trips, special tokens, chat rendering, storage."""
import os
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanochat.common import UserError
from nanochat.tokenizer import (SPECIAL_TOKENS, Tokenizer, compute_token_bytes, get_token_bytes,
                                get_tokenizer)


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return Tokenizer.from_directory(os.path.join(tiny_base_dir, "tokenizer"))


UNICODE_SAMPLES = [
    "",
    "Hello, world! The king's crown, 12345 and 3.14159.",
    "naïve café — Grüße aus Köln; 日本語のテキスト; Ελληνικά; emoji 🙂🚀👩‍👩‍👧",
    "  leading spaces\n\n\ttabs\r\nwindows newline   trailing   ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "\x00\x01 control bytes and a lone combining accent e\u0301",
]


def test_train_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == 512
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    # specials sit after the learned merges, in declaration order
    n = tok.get_vocab_size()
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n - len(SPECIAL_TOKENS), n))
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_training_learns_merges():
    texts = ["the cat sat on the mat. " * 20, "the dog sat on the log. " * 20]
    t = Tokenizer.train_from_iterator(iter(texts), 300)
    ids = t.encode("the cat sat on the mat.")
    assert len(ids) < len("the cat sat on the mat.".encode())  # merges compress frequent text
    assert t.decode(ids) == "the cat sat on the mat."


def test_vocab_too_small_is_user_error():
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train_from_iterator(iter(["abc"]), 100)


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_round_trip_samples(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.get_vocab_size() for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_text(tiny_base_dir, text):
    tok = _cached_tok(tiny_base_dir)
    assert tok.decode(tok.encode(text)) == text


_CACHE = {}


def _cached_tok(d):
    if d not in _CACHE:
        _CACHE[d] = Tokenizer.from_directory(os.path.join(d, "tokenizer"))
    return _CACHE[d]


def test_special_tokens_never_from_plain_text(tok):
    special_ids = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    text = "prefix " + " ".join(SPECIAL_TOKENS) + "<|bos|><|bos|> suffix"
    ids = tok.encode(text)
    assert not special_ids & set(ids)
    assert tok.decode(ids) == text
    for name in SPECIAL_TOKENS:  # each special is exactly one id, and decodes to its name
        assert tok.decode([tok.encode_special(name)]) == name
        assert tok.id_to_token(tok.encode_special(name)) == name


def test_encode_prepend_append_and_batch(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    plain = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>", append=end) == [bos] + plain + [end]
    assert tok.encode("hello world", prepend=bos) == [bos] + plain
    batch = tok.encode(UNICODE_SAMPLES, prepend="<|bos|>", num_threads=2)
    assert batch == [[bos] + tok.encode(t) for t in UNICODE_SAMPLES]
    with pytest.raises(TypeError):
        tok.encode(123)


def _reference_render(tok, turns):
    """Independent construction of a rendered chat: (ids, mask) for alternating user/assistant strings."""
    sp = tok.encode_special
    ids, mask = [tok.get_bos_token_id()], [0]
    for i, text in enumerate(turns):
        body = tok.encode(text)
        if i % 2 == 0:
            part = [sp("<|user_start|>")] + body + [sp("<|user_end|>")]
            ids += part
            mask += [0] * len(part)
        else:
            ids += [sp("<|assistant_start|>")] + body + [sp("<|assistant_end|>")]
            mask += [0] + [1] * (len(body) + 1)
    return ids, mask


def _conv(turns, system=None):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def test_render_conversation_mask_is_exactly_assistant_tokens(tok):
    turns = ["What is 2+2?", "It is 4.", "And the café in 日本?", "Closed 🙂"]
    ids, mask = tok.render_conversation(_conv(turns))
    assert (ids, mask) == _reference_render(tok, turns)
    # the masked-in tokens decode to exactly the assistant replies, each followed by its end token
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is 4.<|assistant_end|>Closed 🙂<|assistant_end|>"
    assert tok.encode_special("<|assistant_start|>") in ids


def test_render_conversation_system_merge_and_truncation(tok):
    turns = ["Hi there", "Hello!"]
    ids, mask = tok.render_conversation(_conv(turns, system="Be brief."))
    assert (ids, mask) == _reference_render(tok, ["Be brief.\n\nHi there", "Hello!"])
    short_ids, short_mask = tok.render_conversation(_conv(turns), max_tokens=5)
    full_ids, full_mask = tok.render_conversation(_conv(turns))
    assert (short_ids, short_mask) == (full_ids[:5], full_mask[:5])


def test_render_conversation_tool_parts(tok):
    sp = tok.encode_special
    conv = {"messages": [{"role": "user", "content": "compute"},
                         {"role": "assistant", "content": [
                             {"type": "text", "text": "Let me see."},
                             {"type": "python", "text": "1+1"},
                             {"type": "python_output", "text": "2"},
                             {"type": "text", "text": "Two."}]}]}
    ids, mask = tok.render_conversation(conv)
    a, p, o, t = tok.encode("Let me see."), tok.encode("1+1"), tok.encode("2"), tok.encode("Two.")
    tail = ([sp("<|assistant_start|>")] + a + [sp("<|python_start|>")] + p + [sp("<|python_end|>")]
            + [sp("<|output_start|>")] + o + [sp("<|output_end|>")] + t + [sp("<|assistant_end|>")])
    tail_mask = [0] + [1] * (len(a) + len(p) + 2) + [0] * (len(o) + 2) + [1] * (len(t) + 1)
    assert ids[-len(tail):] == tail and mask[-len(tail):] == tail_mask
    assert sum(mask) == len(a) + len(p) + 2 + len(t) + 1


def test_render_conversation_rejects_bad_roles(tok):
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})


def test_render_for_completion(tok):
    turns = ["What is 2+2?", "It is 4.", "And 3+3?", "6"]
    ids = tok.render_for_completion(_conv(turns))
    ref, _ = _reference_render(tok, turns[:3])
    assert ids == ref + [tok.encode_special("<|assistant_start|>")]
    assert tok.render_for_completion(_conv(turns[:3])) == ids  # no trailing assistant: nothing dropped


def test_visualize_tokenization(tok):
    ids, mask = tok.render_conversation(_conv(["hi", "yo"]))
    out = tok.visualize_tokenization(ids, mask)
    green = re.findall("\033\\[92m(.*?)\033\\[0m", out)
    assert "".join(green) == "yo<|assistant_end|>"  # exactly the masked-in tokens are green
    assert out.count("\033[91m") == len(mask) - sum(mask)


def test_token_bytes_count_utf8_bytes(tok):
    tb = compute_token_bytes(tok)
    assert tb.shape == (tok.get_vocab_size(),) and tb.dtype == torch.long
    for s in SPECIAL_TOKENS:
        assert tb[tok.encode_special(s)] == 0
    for text in UNICODE_SAMPLES:  # summing bytes per token recovers the text's UTF-8 length
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_save_load_round_trip(tok, tmp_path, monkeypatch):
    d = tmp_path / "base" / "tokenizer"
    tok.save(str(d))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    loaded = get_tokenizer()
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert loaded.special_tokens == tok.special_tokens and loaded.mergeable_ranks == tok.mergeable_ranks
    for text in UNICODE_SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert torch.equal(get_token_bytes("cpu"), compute_token_bytes(tok))


def test_missing_tokenizer_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"no tokenizer at .*run `python -m scripts.tok_train` first"):
        get_tokenizer()
    with pytest.raises(UserError, match="tok_train"):
        get_token_bytes()


def test_tok_train_and_tok_eval_scripts(tiny_base_env, capsys):
    from scripts import tok_eval, tok_train
    tok_train.main(["--vocab-size", "300", "--max-chars", "20000", "--doc-cap", "500"])
    out = capsys.readouterr().out
    assert "vocab size 300" in out
    tok = get_tokenizer()
    assert tok.get_vocab_size() == 300
    assert get_token_bytes().shape == (300,)
    # the iterator respects the caps: at most max_chars plus one capped document
    docs = list(tok_train.text_iterator(20000, 500))
    assert all(len(d) <= 500 for d in docs) and 20000 <= sum(map(len, docs)) < 20500
    tok_eval.main(["--docs", "10"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) >= {"english", "code", "train", "val"}
    assert float(rows["train"][3]) > 1.0  # merges compress the training text
