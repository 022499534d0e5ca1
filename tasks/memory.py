"""
Long memory in chat: the user states a fact early ("my favourite colour is teal"), maybe a decoy of
the same kind about someone else ("my sister's favourite colour is red"), then many turns of filler
chat, then asks for it back ("what was my favourite colour?"). With a few filler turns this fits a
plain context; with hundreds it is what MegaContext is for (`filler_turns` sets the range).
Scored strictly: the reply must name the right value and no other value of that kind, so echoing
the decoy or listing every colour fails.
"""
import numpy as np

from tasks.arithmetic import make_problem
from tasks.common import GeneratedTask, example_rng
from tasks.longctx import OPEN_SHARE, open_fact
from tasks.longctx import has_word as _has_word
from tasks.splits import CHAT, MEMORY

# the training half (tasks/splits.py), kind -> (how the user states it, how the user asks, the values)
FACTS = {kind: (f.state, f.ask, f.values) for kind, f in MEMORY["train"]["facts"].items()}
_DECOY_OWNERS = MEMORY["train"]["owners"]
_ACKS = CHAT["train"]["acks"]
_SMALL_TALK = CHAT["train"]["small_talk"]


class Memory(GeneratedTask):
    """`filler_turns` = (min, max) user/assistant exchanges between the fact and the question.
    heldout=True draws facts, owners, acknowledgements and small talk from the evaluation half of
    tasks/splits.py (wording, values and chat that training never uses); the default is the training half,
    where open_share of the facts are open facts (tasks/longctx.open_fact: any attribute, made-up values)."""

    def __init__(self, split="train", size=5000, filler_turns=(2, 8), decoy_prob=0.5, seed=0, heldout=False,
                 open_share=OPEN_SHARE, **kwargs):
        super().__init__(split, size, seed, **kwargs)
        self.half = "eval" if heldout else "train"
        self.open_share = open_share
        lo, hi = filler_turns
        if not 0 <= lo <= hi:
            raise ValueError(f"filler_turns must be (min, max) with 0 <= min <= max, got {filler_turns}")
        self.filler_turns, self.decoy_prob = (lo, hi), decoy_prob

    def _filler(self, rng):
        chat = CHAT[self.half]
        if rng.random() < 0.5:
            return rng.choice(chat["small_talk"])
        a, op, b, c = make_problem(rng, 50)
        return chat["sum"][0].format(a=a, op=op, b=b), chat["sum"][1].format(a=a, op=op, b=b, c=c)

    def get_example(self, index):
        rng = example_rng(f"memory{self.seed}", self.split, index)
        half, chat = MEMORY[self.half], CHAT[self.half]
        lead_in = half["lead_in"]
        if self.half == "train" and rng.random() < self.open_share:
            kind, fact, lead_in = open_fact(np.random.default_rng(rng.getrandbits(64)), 2)
        else:
            kind = rng.choice(sorted(half["facts"]))
            fact = half["facts"][kind]
        values = fact.values
        value = rng.choice(values)
        turns = [(lead_in.format(s=fact.state.format(v=value)), rng.choice(chat["acks"]))]
        # a same-kind fact about someone else, placed anywhere in the filler: the near-miss to avoid
        n_filler = rng.randint(*self.filler_turns)
        filler = [self._filler(rng) for _ in range(n_filler)]
        decoy = None
        if rng.random() < self.decoy_prob:
            decoy = rng.choice([v for v in values if v != value])
            owner = rng.choice(half["owners"])
            stmt = half["decoy_lead_in"].format(s=fact.decoy.format(owner=owner, v=decoy))
            filler.insert(rng.randint(0, len(filler)), (stmt, rng.choice(chat["acks"])))
        turns += filler
        messages = []
        for u, a in turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages += [{"role": "user", "content": fact.ask},
                     {"role": "assistant", "content": fact.reply.format(v=value)}]
        return {"messages": messages, "kind": kind, "answer": value, "decoy": decoy, "values": list(values)}

    def evaluate(self, conversation, completion):
        """Right value named, and no other value of the same kind (the decoy included)."""
        values = conversation["values"]
        answer = conversation["answer"]
        if not _has_word(completion, answer):
            return False
        return not any(_has_word(completion, v) for v in values if v != answer)
