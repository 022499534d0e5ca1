"""Tasks: deterministic code-made conversations, correct answers, strict scorers, clear offline errors."""
import os
import re
import subprocess
import sys

import pytest

from nanochat.common import UserError
from tasks.arithmetic import Arithmetic
from tasks.common import Task, TaskMixture, TaskSequence, extract_final_number, load_hf_dataset, render_mc
from tasks.identity import Identity
from tasks.memory import FACTS, Memory
from tasks.longctx import has_word
from tasks.splits import MEMORY, MEMORY_OPEN
from tasks.spelling import Spelling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_TASKS = [Arithmetic, Spelling, Identity, Memory]


class Numbers(Task):
    """A task whose examples are their own index, to test slicing and mixing exactly."""

    def __init__(self, n, tag, **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return (self.tag, i)


def last_reply(conv):
    return conv["messages"][-1]["content"]


@pytest.mark.parametrize("cls", OFFLINE_TASKS)
def test_generators_deterministic_and_split_disjoint(cls):
    a, b = cls(split="train", size=50), cls(split="train", size=50)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert a[7] == a[7] and a[7] == b[7]  # random access gives the same example as a sequential pass
    test = cls(split="test", size=50)
    # train and test come from different streams (a few identical small examples are possible)
    same = sum(a[i] == test[i] for i in range(50))
    assert same < 25
    seeded = cls(split="train", size=50, seed=1)
    assert sum(a[i] == seeded[i] for i in range(50)) < 25
    with pytest.raises(ValueError):
        cls(split="dev")


@pytest.mark.parametrize("cls", OFFLINE_TASKS)
def test_reference_answers_score_correct(cls):
    task = cls(split="test", size=200)
    for conv in task:
        msgs = conv["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert task.evaluate(conv, last_reply(conv)), (conv, last_reply(conv))


def test_arithmetic_answers_are_right_and_near_misses_fail():
    task = Arithmetic(split="train", size=300)
    ops = set()
    for conv in task:
        reply = last_reply(conv)
        m = re.match(r"(\d+) ([-+*]) (\d+) = (-?\d+)\n#### (-?\d+)$", reply)
        assert m, reply
        a, op, b, c, final = m.groups()
        assert int(c) == eval(f"{a}{op}{b}") == int(final) == int(conv["answer"])
        ops.add(op)
    assert ops == {"+", "-", "*"}
    conv = next(c for c in task if abs(int(c["answer"])) >= 10)
    ans = conv["answer"]
    assert task.evaluate(conv, f"#### {ans}")
    assert task.evaluate(conv, f"#### 7\n... no, wait\n#### {ans}")  # the last marker counts
    for wrong in [ans, f"#### {int(ans) + 1}", f"#### {ans}0", f"#### {ans[:-1]}", f"#### -{ans}".replace("--", ""),
                  f"#### {int(ans) - 1}", ""]:
        assert not task.evaluate(conv, wrong), wrong


def test_spelling_and_counting_correct():
    from tasks.spelling import WORDS
    task = Spelling(split="train", size=200)
    kinds = set()
    for conv in task:
        q, reply = conv["messages"][0]["content"], last_reply(conv)
        kinds.add(conv["kind"])
        if conv["kind"] == "spell":
            word = "".join(reply.split("-"))
            assert word in WORDS and word in q and reply == conv["answer"]
            continue
        spelled = reply.split("\n")[0].removeprefix("Spelling it out: ").rstrip(".")
        word = "".join(s.split(" ")[0] for s in spelled.split(", "))
        letter = re.search(r"The letter '(.)' appears (\d+) times", reply).group(1)
        assert word in WORDS and word in q and letter in q
        assert int(conv["answer"]) == word.count(letter)  # the reference count is right
        assert reply.endswith(f"#### {word.count(letter)}")
    assert kinds == {"spell", "count"}


def test_spelling_rejects_near_misses():
    task = Spelling(split="test", size=20)
    spell_conv = next(c for c in task if c["kind"] == "spell")
    ans = spell_conv["answer"]
    assert task.evaluate(spell_conv, ans + ".")
    assert task.evaluate(spell_conv, "  " + ans + "\n")
    for wrong in [ans[:-2], ans + "-s", ans.replace("-", ""), ans.upper(), "Sure! " + ans]:
        assert not task.evaluate(spell_conv, wrong), wrong
    count_conv = next(c for c in task if c["kind"] == "count")
    n = int(count_conv["answer"])
    assert task.evaluate(count_conv, f"#### {n}")
    for wrong in [f"#### {n + 1}", f"#### {n}{n}", f"{n}", f"The answer is {n}"]:
        assert not task.evaluate(count_conv, wrong), wrong


def test_identity_scorer():
    task = Identity(split="test", size=20)
    conv = task[0]
    assert "nanochat" in last_reply(conv) and "MegaContext" in " ".join(last_reply(c) for c in task)
    assert task.evaluate(conv, "I'm nanochat.")
    assert task.evaluate(conv, "I am not ChatGPT, I am nanochat.")
    assert not task.evaluate(conv, "I am ChatGPT.")
    assert not task.evaluate(conv, "I am nanochat. Actually, I am Claude.")
    assert not task.evaluate(conv, "I am a chatbot.")


def test_memory_structure_and_scorer():
    task = Memory(split="train", size=100, filler_turns=(3, 5), decoy_prob=1.0)
    for conv in task:
        msgs = conv["messages"]
        value, decoy = conv["answer"], conv["decoy"]
        assert value in msgs[0]["content"]                      # stated in the first turn
        n_turns = len(msgs) // 2
        assert 1 + 3 + 1 + 1 <= n_turns <= 1 + 5 + 1 + 1      # fact, filler, decoy, question
        assert decoy is not None and decoy != value
        assert sum(decoy in m["content"] for m in msgs[2:-2]) >= 1  # the decoy sits in the filler
        if conv["kind"] == "open":  # an attribute named by statement, question and reply alike, or an event
            o = MEMORY_OPEN
            said = [msgs[0]["content"], msgs[-2]["content"], last_reply(conv)]
            assert any(all(has_word(t, a) for t in said) for a in o["attributes"]) or \
                any(msgs[-2]["content"] == e[2] for e in o["events"])
            assert last_reply(conv).endswith(f" {value}.") and sorted(conv["values"]) == sorted([value, decoy])
        else:
            assert msgs[-2]["content"] == FACTS[conv["kind"]][1]
        assert task.evaluate(conv, last_reply(conv))
        assert task.evaluate(conv, f"It is {value}!")
        assert not task.evaluate(conv, f"It is {decoy}.")                # the near-miss
        assert not task.evaluate(conv, f"Either {value} or {decoy}.")    # hedging
        assert not task.evaluate(conv, "I don't remember.")
    # about half the facts are open ones, whose values repeat rarely: they can only be copied, not recalled
    opens = [c["answer"] for c in task if c["kind"] == "open"]
    assert 30 <= len(opens) <= 70 and len(set(opens)) >= len(opens) - 2
    assert not any(c["kind"] == "open" for c in Memory(split="train", size=50, open_share=0.0))
    # the lucky number: word boundaries, so 7 is not found inside 77
    conv = {"kind": "number", "answer": "7", "values": MEMORY["train"]["facts"]["number"].values}
    assert task.evaluate(conv, "Your lucky number is 7.")
    assert not task.evaluate(conv, "Your lucky number is 77.")
    long = Memory(split="test", size=5, filler_turns=(40, 40), decoy_prob=0.0)
    assert all(len(c["messages"]) == 2 * 42 and c["decoy"] is None for c in long)


def test_memory_heldout_half():
    held_values = {v for f in MEMORY["eval"]["facts"].values() for v in f.values}
    held = Memory(split="test", size=60, decoy_prob=1.0, heldout=True)
    for conv in held:
        msgs, fact = conv["messages"], MEMORY["eval"]["facts"][conv["kind"]]
        assert conv["answer"] in held_values and conv["decoy"] in held_values
        assert msgs[-2]["content"] == fact.ask and held.evaluate(conv, last_reply(conv))
        assert not held.evaluate(conv, f"It is {conv['decoy']}.")
    assert not any(c["answer"] in held_values for c in Memory(split="test", size=60))  # training half by default


def test_task_slicing_mixture_sequence():
    t = Numbers(10, "a", start=2, stop=9, step=3)
    assert [t[i] for i in range(len(t))] == [("a", 2), ("a", 5), ("a", 8)]
    assert t[-1] == ("a", 8)
    with pytest.raises(IndexError):
        t[3]
    a, b = Numbers(5, "a"), Numbers(3, "b")
    mix = TaskMixture([a, b, b], seed=7)
    items = [mix[i] for i in range(len(mix))]
    assert len(mix) == 11 and sorted(items) == sorted([("a", i) for i in range(5)] + 2 * [("b", i) for i in range(3)])
    assert items == [TaskMixture([a, b, b], seed=7)[i] for i in range(11)]       # deterministic
    assert items != [TaskMixture([a, b, b], seed=8)[i] for i in range(11)]       # and seeded
    assert items != [(x, i) for x, n in (("a", 5), ("b", 3), ("b", 3)) for i in range(n)]  # shuffled
    seq = TaskSequence([a, b])
    assert list(seq) == [("a", i) for i in range(5)] + [("b", i) for i in range(3)]


def test_render_mc_and_extract():
    s = render_mc("Capital of France?", ["A", "B"], ["Paris", "Rome"])
    assert "- Paris=A\n- Rome=B" in s and s.startswith("Multiple Choice question: Capital of France?")
    assert extract_final_number("so #### 1,234") == "1234"
    assert extract_final_number("#### -3.5") == "-3.5"
    assert extract_final_number("no marker 5") is None


def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with empty caches (so a developer's cached copy cannot make a load succeed);
    the library-level switches that load_hf_dataset flips are restored after the test."""
    import datasets
    import huggingface_hub.constants as hub_constants
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf / "datasets")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf / "hub"))


def test_hub_loader_offline_error_in_process(monkeypatch, tmp_path):
    offline_hub(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=r"ARC-Easy needs the Hugging Face dataset allenai/ai2_arc.*HF_HUB_OFFLINE=1"):
        load_hf_dataset("allenai/ai2_arc", "ARC-Easy", "test", task="ARC-Easy")


def test_hub_tasks_fail_fast_offline(tmp_path):
    # a fresh interpreter, as a user would run it: one clear line per task, quickly, no hang
    code = """
import time
from nanochat.common import UserError
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.smoltalk import SmolTalk
for make in [lambda: ARC("ARC-Challenge"), MMLU, GSM8K, HumanEval, SmolTalk]:
    t0 = time.time()
    try:
        make()
        print("LOADED")
    except UserError as e:
        print("USERERROR", round(time.time() - t0, 1), e)
"""
    hf = tmp_path / "hf"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf), HF_DATASETS_CACHE=str(hf / "datasets"),
               HF_HUB_CACHE=str(hf / "hub"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("USERERROR") for line in lines), r.stdout
    for line, name in zip(lines, ["allenai/ai2_arc/ARC-Challenge", "cais/mmlu/all", "openai/gsm8k/main",
                                  "openai/openai_humaneval", "HuggingFaceTB/smol-smoltalk"]):
        assert name in line and "HF_HUB_OFFLINE=1" in line and "offline tasks are" in line, line
        assert float(line.split()[1]) < 20  # fails fast


def test_humaneval_runner():
    from tasks.humaneval import HumanEval, extract_program
    conv = {"prompt": "def add(a, b):\n", "entry_point": "add",
            "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    he = HumanEval.__new__(HumanEval)  # the scorer needs no dataset
    assert he.evaluate(conv, "```python\ndef add(a, b):\n    return a + b\n```")
    assert he.evaluate(conv, "    return a + b\n")          # body only: the prompt is prepended
    assert not he.evaluate(conv, "    return a - b\n")
    assert extract_program("x\n```python\nprint(1)\n```") == "print(1)\n"
