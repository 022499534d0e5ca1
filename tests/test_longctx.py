"""Synthetic long-context tasks: exact answer spans, needles where they claim to be, decoys that use the asked label."""
import re

import numpy as np
import pytest

from tasks.longctx import (COLOURS, MULTI_QUESTIONS, MULTI_QUESTIONS_HELDOUT, PASSKEY_NEEDLES, PLANS, TASKS, kv_recall,
                           multikey, passkey, raw_example)
from tasks.splits import PASSKEY, key_split

FILLER = ("The river ran past the old mill and the miller counted his sacks of grain before the winter came. "
          "In the evening the lamps were lit and the children listened to stories of kings and distant lands. ")


class CharTok:
    """A byte-level stand-in: every character one token."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")  # a cut can split a character


def test_passkey_answer_span_and_needle():
    tok = CharTok()
    for seed in range(5):
        ex = passkey(FILLER, tok, np.random.default_rng(seed), n_tokens=600)
        a, b = ex.answer_span
        assert b == len(ex.ids) and tok.decode(ex.ids[a:b]) == ex.answer + "."
        key = ex.answer.strip()
        assert re.fullmatch(r"\d{5}", key)
        n0, n1 = ex.needle_spans[0]
        assert n1 <= ex.question_start < a
        assert key in tok.decode(ex.ids[n0:n1]) and "pass key" in tok.decode(ex.ids[n0:n1])
        assert abs(ex.question_start - 600) <= 1  # the history is the requested length
        # the key appears exactly once in the history
        assert tok.decode(ex.ids[:ex.question_start]).count(key) == 1


def test_passkey_depth_and_wording_vary():
    tok = CharTok()
    early = passkey(FILLER, tok, np.random.default_rng(0), 1000, depth=0.05)
    late = passkey(FILLER, tok, np.random.default_rng(0), 1000, depth=0.95)
    assert early.needle_spans[0][0] < 100 < 850 < late.needle_spans[0][0]
    used = set()
    for seed in range(40):
        ex = passkey(FILLER, tok, np.random.default_rng(seed), 400)
        n0, n1 = ex.needle_spans[0]
        text = tok.decode(ex.ids[n0:n1]).replace(ex.answer.strip(), "{key}")
        assert text in PASSKEY_NEEDLES
        used.add(text)
    assert len(used) >= 3
    # deterministic under a seeded generator
    assert passkey(FILLER, tok, np.random.default_rng(7), 400).ids == passkey(FILLER, tok, np.random.default_rng(7), 400).ids


def test_multikey_question_names_the_asked_key_and_decoys_are_near_misses():
    tok = CharTok()
    for seed in range(5):
        ex = multikey(FILLER, tok, np.random.default_rng(seed), 1500, n_keys=4, n_decoys=2)
        q = tok.decode(ex.ids[ex.question_start:ex.answer_span[0]])
        asked = [c for c in COLOURS if f" {c} key" in q]
        assert len(asked) == 1
        asked = asked[0]
        needles = [tok.decode(ex.ids[a:b]) for a, b in ex.needle_spans]
        assert f"{asked} key" in needles[0] and re.search(rf"\b{ex.answer.strip()}\b", needles[0])
        assert len({re.search(r"[Tt]he (\w+) key", n).group(1) for n in needles}) == 4  # distinct colours
        for a, b in ex.decoy_spans:
            d = tok.decode(ex.ids[a:b])
            assert asked in d and "key" not in d and ex.answer.strip() not in d
        spans = sorted(ex.needle_spans + ex.decoy_spans)
        assert all(s1[1] <= s2[0] for s1, s2 in zip(spans, spans[1:]))  # no overlaps


def test_multikey_held_out_wording_is_never_the_training_wording():
    tok = CharTok()
    train = {q.format(c="red") for q in MULTI_QUESTIONS}
    held = {q.format(c="red") for q in MULTI_QUESTIONS_HELDOUT}
    assert not train & held and all(q.endswith("The red key is") for q in train | held)
    seen = {"train": set(), "held": set()}
    for seed in range(40):
        for name, qs in (("train", MULTI_QUESTIONS), ("held", MULTI_QUESTIONS_HELDOUT)):
            ex = multikey(FILLER, tok, np.random.default_rng(seed), 1500, questions=qs)
            q = tok.decode(ex.ids[ex.question_start:ex.answer_span[0]])
            colour = next(c for c in COLOURS if f" {c} key?" in q or f" {c} key " in q or f" {c} key." in q)
            seen[name].add(q.replace(colour, "red"))
    assert seen["train"] == train and seen["held"] == held  # every template used, each only on its side


def test_kv_recall_and_real_tokenizer(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    ex = kv_recall(FILLER, tok, np.random.default_rng(3), 400, n_pairs=5)
    a, b = ex.answer_span
    assert tok.decode(ex.ids[a:b]) == ex.answer + "."
    q = tok.decode(ex.ids[ex.question_start:a])
    name = q.split("record.")[1].split("->")[0].strip()
    first = tok.decode(ex.ids[ex.needle_spans[0][0]:ex.needle_spans[0][1]])
    assert f"{name} ->{ex.answer}." in first
    assert len(ex.needle_spans) == 5


def test_too_short_history_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        multikey(FILLER, CharTok(), np.random.default_rng(0), 50, n_keys=4)


def test_passkey_key_span_and_key_in_block():
    tok = CharTok()
    for seed in range(20):
        ex = passkey(FILLER, tok, np.random.default_rng(seed), n_tokens=600, key_in_block=32)
        (a, b), = ex.key_spans
        assert tok.decode(ex.ids[a:b]) == ex.answer.strip()
        n0, n1 = ex.needle_spans[0]
        assert n0 <= a and b <= n1
        assert a // 32 == (b - 1) // 32  # the whole key inside one aligned block
    # without the constraint some keys straddle a block boundary (so the option does something)
    straddle = [(lambda s: s[0] // 32 != (s[1] - 1) // 32)(passkey(FILLER, tok, np.random.default_rng(s), 600)
                                                          .key_spans[0]) for s in range(60)]
    assert any(straddle)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_raw_generator_keeps_its_spans_exact(split):
    tok = CharTok()
    assert set(TASKS) == set(PLANS)  # one registry line makes a task reachable both ways
    for task in ("passkey", "multikey", "kv_recall"):
        for seed in range(4):
            ex = raw_example(task, FILLER, tok, np.random.default_rng(seed), 1200, split=split)
            plan, (a, b) = ex.plan, ex.answer_span
            assert b == len(ex.ids) and ex.answer == " " + plan.answer and tok.decode(ex.ids[a:b]) == ex.answer + "."
            assert abs(ex.question_start - 1200) <= 1 and tok.decode(ex.ids[ex.question_start:a]) == plan.question
            assert [tok.decode(ex.ids[s:e]) for s, e in ex.needle_spans] == plan.needles
            assert [tok.decode(ex.ids[s:e]) for s, e in ex.decoy_spans] == plan.decoys
            assert plan.answer in tok.decode(ex.ids[slice(*ex.needle_spans[0])]) and key_split(plan.answer) == split
            if task == "passkey":
                (k0, k1), = ex.key_spans
                assert tok.decode(ex.ids[k0:k1]) == plan.answer
            else:
                assert ex.key_spans == []  # as before the split: the harness scores their needle sentences
    # the eval half's needles, and a fixed depth for the asked one whatever the task
    ex = passkey(FILLER, tok, np.random.default_rng(0), 600, split="eval")
    needle = tok.decode(ex.ids[slice(*ex.needle_spans[0])])
    assert needle.replace(ex.answer.strip(), "{key}") in PASSKEY["eval"]["needles"]
    ex = raw_example("multikey", FILLER, tok, np.random.default_rng(0), 2000, split="eval", depth=0.95)
    assert ex.needle_spans[0][0] > 1700
    with pytest.raises(ValueError, match="split"):
        passkey(FILLER, tok, np.random.default_rng(0), 600, split="test")
