"""The chat view of every long-context task: a conversation that states the facts, reaches the requested
length, ends with the question, and scores replies strictly; its token ids are the chat format's."""
import numpy as np
import pytest

from tasks.chat_view import chat_example, chat_to_raw, render_messages, turn_cost
from tasks.longctx import PLANS, chat_memory, score_reply
from tasks.splits import CHAT, SPLITS
from test_longctx import CharTok

FILLER = ("The river ran past the old mill and the miller counted his sacks of grain before the winter came.\n\n"
          "In the evening the lamps were lit and the children listened to stories of kings and distant lands. ")


@pytest.mark.parametrize("task", list(PLANS))
def test_chat_view_states_facts_reaches_length_and_asks_last(task):
    tok = CharTok()
    for split in SPLITS:
        for seed, n in enumerate((700, 3000, 12000)):
            chat = chat_example(task, FILLER, tok, np.random.default_rng(seed), n, split=split)
            msgs, plan = chat.messages, chat.plan
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"]
            assert msgs[-1]["content"] == plan.chat_question
            # every statement is a user turn, where the example says; the asked one holds the answer
            assert [msgs[i]["content"] for i in chat.needle_turns] == plan.chat_needles
            assert [msgs[i]["content"] for i in chat.decoy_turns] == plan.chat_decoys
            assert chat.answer in msgs[chat.needle_turns[0]]["content"]
            # the history (BOS + every turn before the question) is measured right and near the request
            hist = 1 + sum(turn_cost(tok, m["role"], m["content"]) for m in msgs[:-1])
            assert hist == chat.history_tokens and n - 40 <= hist <= n, (hist, n)
            if n >= 3000:  # long histories are mostly pasted text, with some small talk between
                assert sum(m["content"].count("miller") for m in msgs) >= 3 and len(msgs) >= 7
            # the reference reply scores right; a decoy, a hedge and a near-miss key do not
            assert chat.score(chat.reply) and chat.answer in chat.reply
            assert not chat.score("I don't remember.")
            for other in [v for v in plan.values if v != plan.answer][:2]:
                assert not chat.score(chat.reply.replace(chat.answer, other))
                assert not chat.score(f"{chat.answer} or {other}")


def test_chat_view_depth_and_small_talk_only():
    tok = CharTok()
    for depth, lo, hi in ((0.05, 0.0, 0.3), (0.95, 0.7, 1.0)):
        chat = chat_example("passkey", FILLER, tok, np.random.default_rng(1), 6000, depth=depth)
        assert lo <= chat.needle_turns[0] / len(chat.messages) <= hi
    chat = chat_example("chat_memory", None, tok, np.random.default_rng(2), 2000, split="eval")
    assert chat.needle_turns[0] < len(chat.messages) // 4  # the fact is stated early
    assert not any("\n\n" in m["content"] for m in chat.messages)  # nothing pasted: small talk only
    shortest = min(2 + len(u) + 2 + len(a) for u, a in CHAT["eval"]["small_talk"])
    assert 2000 - max(shortest, 60) <= chat.history_tokens <= 2000  # sums can be shorter than small talk
    with pytest.raises(ValueError, match="too short"):
        chat_example("multikey", FILLER, tok, np.random.default_rng(0), 60)


def test_strict_scoring_of_keys():
    chat = chat_example("passkey", FILLER, CharTok(), np.random.default_rng(3), 800)
    key = chat.answer
    assert score_reply(chat.plan, f"It is {key}.") and chat.score(key)
    wrong = str((int(key) + 1) % 100000).zfill(5)
    for reply in (f"{key}0", f"{key[:-1]}", f"{key} or maybe {wrong}", wrong, f"{key}{key}"):
        assert not chat.score(reply), reply


def test_raw_view_of_a_chat_is_the_chat_format(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    for task in PLANS:
        chat = chat_example(task, FILLER, tok, np.random.default_rng(5), 900, split="eval")
        ex = chat_to_raw(chat, tok)
        ids, mask = tok.render_conversation(chat.conversation(), max_tokens=10**9)
        assert ex.ids == ids  # exactly what SFT and the chat runtime see
        a, b = ex.answer_span
        assert ex.ids[:a] == tok.render_for_completion(chat.conversation())
        assert tok.decode(ex.ids[a:b]) == chat.reply + "<|assistant_end|>" and all(mask[a:b])
        assert ex.question_start == chat.history_tokens and ex.ids[ex.question_start] == tok.encode_special(
            "<|user_start|>")
        assert tok.decode(ex.ids[ex.question_start + 1:a - 2]) == chat.plan.chat_question
        assert [tok.decode(ex.ids[s:e]) for s, e in ex.needle_spans] == chat.plan.chat_needles
        assert [tok.decode(ex.ids[s:e]) for s, e in ex.decoy_spans] == chat.plan.chat_decoys
        (s, e), = ex.key_spans
        n0, n1 = ex.needle_spans[0]
        assert n0 <= s < e <= n1 and chat.answer in tok.decode(ex.ids[s:e])
        assert chat.answer not in tok.decode(ex.ids[s + 1:e]) and chat.answer not in tok.decode(ex.ids[s:e - 1])
        assert score_reply(ex, chat.reply)
    # chat_memory's raw view is its chat rendered with the chat special tokens
    ex = chat_memory(FILLER, tok, np.random.default_rng(6), 700, split="eval")
    assert ex.plan.chat_only and ex.answer == ex.plan.reply and abs(ex.question_start - 700) <= 40
    assert render_messages([{"role": "user", "content": "hi"}], tok)[0][-1] == tok.encode_special("<|assistant_start|>")
