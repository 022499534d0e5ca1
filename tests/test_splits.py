"""Train and eval halves of the long-context tasks share nothing: templates, wordings, names, key values."""
import re

import numpy as np
import pytest

from tasks.chat_view import chat_example
from tasks.longctx import PLANS, has_word, random_key, raw_example
from tasks.splits import BABI, CHAT, SPLITS, inventory, key_split
from test_longctx import CharTok

FILLER = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor incididunt ut labore. " * 4
OTHER = {"train": "eval", "eval": "train"}


def template_regex(t):
    """A template as a regex: its literal text, each {placeholder} one run of characters within a sentence."""
    parts = re.split(r"\{\w+\}", t.strip())
    return re.compile(r"[^.?!\n]+?".join(re.escape(p) for p in parts))


def foreign(text, split):
    """What of the other half a text holds: [(kind, item)]."""
    inv = inventory(OTHER[split])
    found = [("name", n) for n in inv["names"] if has_word(text, n)]
    return found + [("template", t) for t in inv["templates"] if template_regex(t).search(text)]


def test_halves_share_no_template_wording_or_name():
    train, ev = inventory("train"), inventory("eval")
    assert not train["templates"] & ev["templates"]
    assert not {n.lower() for n in train["names"]} & {n.lower() for n in ev["names"]}
    # the checker sees a training needle and name in an eval text, and an eval wording in a training one
    assert ("name", "red") in foreign("Note: the red key is 12345.", "eval")
    assert ("template", " Note: the {c} key is {key}. ") in foreign("Note: the red key is 12345.", "eval")
    assert foreign("Remind me of the pass key, please.", "train")
    for split in SPLITS:  # nor does any template of one half use a name or a template of the other
        for t in inventory(split)["templates"]:
            assert foreign(t.replace("{", "").replace("}", ""), split) == [], t


def test_babi_halves_share_no_actor_place_object_or_wording():
    tr, ev = BABI["train"], BABI["eval"]
    for key in ("actors", "places", "objects", "lead_ins"):
        assert not {v.lower() for v in tr[key]} & {v.lower() for v in ev[key]}, key
    for kind in tr["facts"]:
        assert not set(tr["facts"][kind]) & set(ev["facts"][kind]), kind
    for task in tr["questions"]:
        assert not {t for q in tr["questions"][task] for t in q} & {t for q in ev["questions"][task] for t in q}
        assert tr["replies"][task] != ev["replies"][task]
    for split in SPLITS:  # one word each, so whole-word checks (scoring, the checker) see them
        b = BABI[split]
        assert all(re.fullmatch(r"[A-Za-z]+", n) for n in b["actors"] + b["places"] + b["objects"])
        # a fact of one half, with its own names, is caught in the other half by name and by wording
        for kind, temps in b["facts"].items():
            for t in temps:
                text = t.format(a=b["actors"][0], b=b["actors"][1], p=b["places"][0], o=b["objects"][0])
                assert foreign(text, OTHER[split]) and ("template", t) in foreign(text, OTHER[split]), text
                assert foreign(text, split) == []


def test_keys_same_shape_disjoint_values():
    rng = np.random.default_rng(0)
    for split in SPLITS:
        keys = [random_key(rng, split=split) for _ in range(3000)]
        assert all(re.fullmatch(r"\d{5}", k) and key_split(k) == split for k in keys)
        for pos in range(5):  # every digit in every place: the halves differ in value, not in shape
            assert {k[pos] for k in keys} == set("0123456789")
    assert key_split("00000") == "train" and key_split("00001") == "eval"


@pytest.mark.parametrize("split", SPLITS)
def test_examples_hold_only_their_own_half(split):
    tok = CharTok()
    sum_re = template_regex(CHAT[split]["sum"][0])
    intros = tuple(CHAT[split]["paste_intros"])
    for task in PLANS:
        for seed in range(6):
            chat = chat_example(task, FILLER, tok, np.random.default_rng(seed), 1500, split=split)
            assert chat.plan.split == split
            # what the task wrote (pasted filler text and sums are not templates: numbers there are arithmetic)
            texts = [m["content"] for i, m in enumerate(chat.messages)
                     if not (m["content"].startswith(intros) or sum_re.search(m["content"])
                             or (i and chat.messages[i - 1]["content"].startswith(intros))
                             or (i and sum_re.search(chat.messages[i - 1]["content"])))]
            # the reply without its value: "The pass key is 12345." is also a training multikey needle with
            # c="pass", the answer format both halves share on purpose (tasks/splits.py); the value is checked below
            for t in texts + [chat.reply.replace(chat.answer, "")]:
                assert foreign(t, split) == [], (task, t)
            own = inventory(split)["names"]
            # a value is one of the half's names, or (training's open facts) a made-up value that is no eval name
            assert all(key_split(v) == split if v.isdigit() and len(v) == 5
                       else v in own or (split == "train" and foreign(v, split) == []) for v in chat.plan.values)
            if chat.plan.chat_only:
                continue
            ex = raw_example(task, FILLER, tok, np.random.default_rng(seed), 1500, split=split)
            pieces = [tok.decode(ex.ids[a:b]) for a, b in ex.needle_spans + ex.decoy_spans]
            pieces.append(tok.decode(ex.ids[ex.question_start:ex.answer_span[0]]))
            for t in pieces:
                assert foreign(t, split) == [], (task, t)
            assert all(key_split(v) == split if v.isdigit() else v in own for v in ex.plan.values)  # keys, places
