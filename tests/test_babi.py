"""bAbI-style stories: every answer is what the story implies (an independent replay of the rendered text), the
supporting facts alone imply it, spans are exact in both views, and midtraining rows open the supporting blocks."""
import re

import numpy as np
import pytest

from tasks.babi import MIN_FACTS, STORY_TASKS, Event, World, story_plan
from tasks.chat_view import chat_example, chat_to_raw
from tasks.longctx import PLANS, TASKS, has_word, make_plan, raw_example, score_reply
from tasks.splits import BABI, SPLITS
from test_chat_view import FILLER
from test_longctx import CharTok


def rng(seed):
    return np.random.default_rng(seed)


def _match(templates, text):
    """The placeholders' values of the template that the whole text matches, or None."""
    for t in templates:
        rx = "".join(f"(?P<{p[1:-1]}>\\w+)" if re.fullmatch(r"\{\w+\}", p) else re.escape(p)
                     for p in re.split(r"(\{\w+\})", t))
        m = re.fullmatch(rx, text)
        if m:
            return m.groupdict()
    return None


def parse_fact(text, split):
    """A fact sentence back to (kind, actor, place or object, receiver), read with the split's wordings."""
    for kind, temps in BABI[split]["facts"].items():
        g = _match(temps, text.strip())
        if g:
            return kind, g["a"], g.get("p") or g["o"], g.get("b")
    raise AssertionError(f"not a {split} fact: {text!r}")


def parse_question(text, task, split):
    g = _match([raw for raw, _ in BABI[split]["questions"][task]], text)
    assert g, text
    return g


def replay(facts, strict=True):
    """Brute force, independent of tasks/babi.World: after every fact, every held object is put where its holder
    is; each object's trail = its places in order. strict: each fact must obey the world's rules."""
    loc, holder, obj_loc, trails = {}, {}, {}, {}
    for kind, a, x, b in facts:
        if kind == "move":
            assert not strict or loc.get(a) != x
            loc[a] = x
        elif kind == "get":
            assert not strict or (a in loc and x not in holder and obj_loc.get(x, loc[a]) == loc[a])
            holder[x] = a
        elif kind == "drop":  # it stays where it was dropped
            assert not strict or holder.get(x) == a
            holder.pop(x, None)
            if a in loc:
                obj_loc[x] = loc[a]
        else:
            assert not strict or (holder.get(x) == a and b != a and loc.get(b) == loc[a])
            holder[x] = b
        for o, h in holder.items():
            if h in loc:
                obj_loc[o] = loc[h]
        for o, p in obj_loc.items():
            t = trails.setdefault(o, [])
            if not t or t[-1] != p:
                t.append(p)
    return loc, obj_loc, trails


def replayed_answer(task, facts, q, strict=True):
    loc, obj_loc, trails = replay(facts, strict)
    if task == "qa1":
        return loc.get(q["a"])
    if task == "qa2":
        return obj_loc.get(q["o"])
    trail = trails.get(q["o"], [])
    assert trail.count(q["p"]) == 1 and trail.index(q["p"]) > 0, (trail, q)  # "before the kitchen" is unambiguous
    return trail[trail.index(q["p"]) - 1]


def test_registered_both_ways():
    for task in STORY_TASKS:
        assert task in PLANS and task in TASKS
        ex = TASKS[task](FILLER, CharTok(), rng(0), 800, split="eval")
        assert ex.plan.task == task and ex.plan.split == "eval" and ex.question_start == 800
    same = [raw_example("qa2", FILLER, CharTok(), rng(4), 900).ids for _ in range(2)]
    assert same[0] == same[1]  # deterministic under a seeded generator
    with pytest.raises(ValueError, match="key_in_block"):
        raw_example("qa1", FILLER, CharTok(), rng(0), 800, key_in_block=32)


@pytest.mark.parametrize("task", STORY_TASKS)
def test_replaying_the_story_gives_the_answer_and_the_supporting_facts_suffice(task):
    tok = CharTok()
    for split in SPLITS:
        for seed in range(24):
            n_facts = [None, (8, 12), 30][seed % 3]
            ex = raw_example(task, FILLER, tok, rng(seed), 3000, split=split, n_facts=n_facts)
            answer = ex.answer.strip()
            q = parse_question(tok.decode(ex.ids[ex.question_start:ex.answer_span[0]]), task, split)
            story = [parse_fact(tok.decode(ex.ids[a:b]), split) for a, b in sorted(ex.needle_spans + ex.decoy_spans)]
            assert replayed_answer(task, story, q) == answer
            # the needles are the supporting facts: alone (in story order) they still say it, the first names it
            support = [parse_fact(tok.decode(ex.ids[a:b]), split) for a, b in sorted(ex.needle_spans)]
            assert len(support) == MIN_FACTS[task] and replayed_answer(task, support, q, strict=False) == answer
            assert has_word(tok.decode(ex.ids[slice(*ex.needle_spans[0])]), answer)
            if task == "qa2":  # the answering fact says where someone went, never the asked object
                assert not has_word(tok.decode(ex.ids[slice(*ex.needle_spans[0])]), q["o"])
            # and the structured story the plan kept is the one rendered
            assert [tuple(e) for e in ex.plan.events] == story


def test_the_world_keeps_the_rules():
    w = World()
    for i, e in enumerate([Event("move", "Mary", "kitchen"), Event("move", "John", "garden"),
                           Event("get", "Mary", "milk")]):
        w.apply(i, e)
    for bad in (Event("give", "Mary", "milk", "John"),   # John is elsewhere
                Event("get", "John", "milk"),            # Mary holds it
                Event("drop", "John", "milk"),           # not his
                Event("move", "Mary", "kitchen")):       # already there
        assert not w.legal(bad)
        with pytest.raises(ValueError):
            w.apply(3, bad)
    w.apply(3, Event("move", "Mary", "office"))
    w.apply(4, Event("drop", "Mary", "milk"))
    w.apply(5, Event("move", "Mary", "garden"))
    assert w.where_object("milk") == ("office", [3, 4]) and w.where_actor("Mary") == ("garden", [5])
    assert w.before("milk", "office") == ("kitchen", [0, 2, 3]) and w.before("milk", "kitchen") is None
    assert not w.legal(Event("get", "John", "milk"))  # it lies in the office
    assert not w.legal(Event("give", "Mary", "milk", "John"))  # same place, but she dropped it
    w.apply(6, Event("move", "John", "office"))
    w.apply(7, Event("get", "John", "milk"))
    w.apply(8, Event("move", "Mary", "office"))
    w.apply(9, Event("give", "John", "milk", "Mary"))
    w.apply(10, Event("move", "Mary", "hallway"))
    assert w.where_object("milk") == ("hallway", [10, 9]) and w.before("milk", "hallway") == ("office", [8, 9, 10])


@pytest.mark.parametrize("split", SPLITS)
def test_raw_spans_are_exact_and_the_story_keeps_its_order(split):
    tok = CharTok()
    for task in STORY_TASKS:
        for seed in range(6):
            ex = raw_example(task, FILLER, tok, rng(seed), 2000, split=split, n_facts=(6, 14))
            p, (a, b) = ex.plan, ex.answer_span
            assert ex.question_start == 2000 and tok.decode(ex.ids[ex.question_start:a]) == p.question
            assert b == len(ex.ids) and tok.decode(ex.ids[a:b]) == " " + p.answer + "."
            assert [tok.decode(ex.ids[s:e]) for s, e in ex.needle_spans] == p.needles
            assert [tok.decode(ex.ids[s:e]) for s, e in ex.decoy_spans] == p.decoys
            spans = sorted(ex.needle_spans + ex.decoy_spans)
            assert all(s1[1] <= s2[0] for s1, s2 in zip(spans, spans[1:])) and spans[-1][1] <= ex.question_start
            assert [tok.decode(ex.ids[s:e]) for s, e in spans] == p.story  # in story order
            assert ex.needle_spans == [spans[i] for i in p.support]
            (k0, k1), = ex.key_spans
            n0, n1 = ex.needle_spans[0]
            assert n0 <= k0 < k1 <= n1 and tok.decode(ex.ids[k0:k1]) == p.answer
    # the answering fact at a requested depth, the rest of the story around it in order; 256x a 64-token budget
    for depth in (0.0, 0.05, 0.5, 0.95, 1.0):
        ex = raw_example("qa3", FILLER, tok, rng(1), 16384, split=split, depth=depth, n_facts=20)
        p = ex.plan
        before = sum(len(p.story[i]) for i in range(p.support[0]))  # the facts before it (a character a token)
        assert ex.needle_spans[0][0] - before == int(depth * (16384 - sum(map(len, p.story))))
        spans = sorted(ex.needle_spans + ex.decoy_spans)
        assert [tok.decode(ex.ids[s:e]) for s, e in spans] == ex.plan.story and ex.question_start == 16384


def test_chat_view_states_every_fact_in_order_and_asks_last():
    tok = CharTok()
    for task in STORY_TASKS:
        for split in SPLITS:
            for seed, (n, facts) in enumerate([(700, None), (4000, 12), (12000, 30)]):
                chat = chat_example(task, FILLER, tok, rng(seed), n, split=split, n_facts=facts)
                msgs, p = chat.messages, chat.plan
                assert msgs[-1] == {"role": "user", "content": p.chat_question} and n - 40 <= chat.history_tokens <= n
                turns = sorted(chat.needle_turns + chat.decoy_turns)
                assert [msgs[i]["content"] for i in turns] == p.chat_story  # every fact, a user turn, story order
                assert all(msgs[i]["role"] == "user" and msgs[i + 1]["role"] == "assistant" for i in turns)
                assert chat.needle_turns == [turns[i] for i in p.support]
                assert [msgs[i]["content"] for i in chat.needle_turns] == p.chat_needles
                assert [msgs[i]["content"] for i in chat.decoy_turns] == p.chat_decoys
                assert has_word(msgs[chat.needle_turns[0]]["content"], p.answer)
                lead = {t.split("{")[0] for t in BABI[split]["lead_ins"]}
                assert all(c.startswith(tuple(lead)) for c in p.chat_story)
    early = chat_example("qa1", FILLER, tok, rng(3), 8000, depth=0.05, n_facts=6)
    late = chat_example("qa1", FILLER, tok, rng(3), 8000, depth=0.95, n_facts=6)
    assert early.needle_turns[0] < 0.3 * len(early.messages) < 0.7 * len(late.messages) < late.needle_turns[0]


def test_strict_scoring_names_the_place_and_no_other():
    for task in STORY_TASKS:
        for split in SPLITS:
            p = make_plan(task, rng(5), split, n_facts=10)
            assert p.answer in p.values and set(p.values) <= set(BABI[split]["places"])
            other = next(v for v in p.values if v != p.answer)
            assert score_reply(p, p.reply) and score_reply(p, p.answer) and score_reply(p, p.answer.upper() + ".")
            for bad in (p.reply.replace(p.answer, other), f"{p.answer} or the {other}", "I don't know.",
                        p.answer + "s"):
                assert not score_reply(p, bad), bad
    p = story_plan("qa3", rng(6), "train", n_facts=10)
    asked = p.asked[1]
    assert asked not in p.values  # echoing the question's own place is no wrong candidate
    assert score_reply(p, f"Before the {asked}, the {p.asked[0]} was in the {p.answer}.")


def test_raw_and_chat_with_the_real_tokenizer(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    for task in STORY_TASKS:
        ex = raw_example(task, FILLER, tok, rng(2), 1500, split="eval", n_facts=10)
        assert ex.question_start == 1500
        assert [tok.decode(ex.ids[s:e]) for s, e in ex.needle_spans] == ex.plan.needles
        assert [tok.decode(ex.ids[s:e]) for s, e in ex.decoy_spans] == ex.plan.decoys
        assert ex.plan.answer in tok.decode(ex.ids[slice(*ex.key_spans[0])])
        assert tok.decode(ex.ids[slice(*ex.answer_span)]) == ex.answer + "."
        chat = chat_example(task, FILLER, tok, rng(2), 1500, split="eval", n_facts=10)
        craw = chat_to_raw(chat, tok)
        assert [tok.decode(craw.ids[s:e]) for s, e in craw.needle_spans] == chat.plan.chat_needles
        assert chat.plan.answer in tok.decode(craw.ids[slice(*craw.key_spans[0])])


def test_midtraining_rows_label_the_answer_and_open_the_supporting_blocks(tiny_base_env, monkeypatch):
    import tasks.mc_mixture as mcm
    from megacontext.config import MCConfig
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    cfg = MCConfig(budget=64, tail_tokens=32, train_min_target=32, max_level=2)
    assert not set(STORY_TASKS) & set(mcm.TASKS)  # in no default list
    assert mcm.MCMixture(tok, cfg, mcm.load_filler()).tasks == mcm.TASKS
    made = []

    def spy(*args, **kwargs):
        made.append(raw_example(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(mcm, "raw_example", spy)
    mix = mcm.MCMixture(tok, cfg, mcm.load_filler(), multiples=(4, 16), tasks=STORY_TASKS)
    K, r = cfg.block_size, rng(0)
    for task in STORY_TASKS:
        for s in (mix.history_len(4), mix.history_len(16)):
            ids, (a, b), blocks = mix._row(task, s, r)
            ex = made[-1]
            assert ids == ex.ids and (a, b) == ex.answer_span and ex.plan.task == task
            assert tok.decode(ids[a:b]) == " " + ex.plan.answer + "."
            assert blocks[0] == ex.key_spans[0][0] // K and max(blocks) * K < s  # the answer word's block first
            for n0, n1 in ex.needle_spans:  # every supporting fact lies in listed blocks
                assert set(range(n0 // K, (n1 - 1) // K + 1)) <= set(blocks)
            first = ex.needle_spans[0]
            assert set(blocks[:len(range(first[0] // K, (first[1] - 1) // K + 1))]) == \
                set(range(first[0] // K, (first[1] - 1) // K + 1))  # the answering fact's blocks lead
        mix.tasks = (task,)
        batch = mix.batch(2, r)
        lab = batch.y != -1
        for row in range(batch.x.size(0)):
            assert re.fullmatch(r" \w+\.", tok.decode(batch.y[row][lab[row]].tolist()))
            assert batch.blocks[row] and not lab[row, :batch.s].any()


def test_chat_story_rows_open_every_supporting_fact(tiny_base_env, monkeypatch):
    """chat_qa*: the story told in a conversation; the needle recipe must open every supporting fact's blocks."""
    import tasks.chat_view as cv
    import tasks.mc_mixture as mcm
    from megacontext.config import MCConfig
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    cfg = MCConfig(budget=64, tail_tokens=32, train_min_target=32, max_level=2)
    made = []

    def spy(*args, **kwargs):
        made.append(chat_to_raw(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(cv, "chat_to_raw", spy)
    mix = mcm.MCMixture(tok, cfg, mcm.load_filler(), multiples=(16,), tasks=("chat_qa2", "chat_qa3"))
    K, r, s = cfg.block_size, rng(1), mix.history_len(16)
    for task in ("chat_qa2", "chat_qa3"):
        ids, (a, b), blocks = mix._row(task, s, r)
        ex = made[-1]
        n = len(ids) - len(ex.ids)  # the corpus text padded in front
        assert ex.plan.task == task.removeprefix("chat_") and len(ex.needle_spans) >= MIN_FACTS[ex.plan.task]
        assert ex.plan.answer in tok.decode(ids[a:b]) and max(blocks) * K < s
        for n0, n1 in ex.needle_spans:
            assert set(range((n0 + n) // K, (n1 + n - 1) // K + 1)) <= set(blocks)
