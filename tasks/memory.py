"""
Long memory in chat: the user states a fact early ("my favourite colour is teal"), maybe a decoy of
the same kind about someone else ("my sister's favourite colour is red"), then many turns of filler
chat, then asks for it back ("what was my favourite colour?"). With a few filler turns this fits a
plain context; with hundreds it is what MegaContext is for (`filler_turns` sets the range).
Scored strictly: the reply must name the right value and no other value of that kind, so echoing
the decoy or listing every colour fails.
"""
import re

from tasks.arithmetic import make_problem
from tasks.common import GeneratedTask, example_rng

# kind -> (how the user states it, how the user asks, the values)
FACTS = {
    "colour": ("my favourite colour is {v}", "What was my favourite colour?",
               ["red", "blue", "green", "yellow", "purple", "orange", "teal", "pink", "black", "white"]),
    "pet": ("my dog's name is {v}", "What is my dog called?",
            ["Rex", "Biscuit", "Luna", "Pepper", "Milo", "Daisy", "Otto", "Ziggy", "Nala", "Bruno"]),
    "city": ("I was born in {v}", "Which city was I born in?",
             ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Dublin", "Quito", "Perth", "Denver", "Madrid"]),
    "number": ("my lucky number is {v}", "What is my lucky number?",
               ["7", "13", "21", "42", "58", "64", "77", "88", "93", "101"]),
    "food": ("my favourite food is {v}", "What's my favourite food?",
             ["pizza", "sushi", "tacos", "curry", "pasta", "ramen", "falafel", "paella", "dumplings", "pancakes"]),
}
_DECOY_OWNERS = ["my sister's", "my friend's", "my boss's", "my neighbour's"]
_ACKS = ["Got it, I'll remember that.", "Noted!", "Thanks for telling me.", "Okay, I'll keep that in mind."]

_SMALL_TALK = [
    ("How's the weather where you are?", "I don't experience weather, but I hope it's nice where you are!"),
    ("Any tips for sleeping better?", "Keep a regular schedule, avoid screens before bed, and keep the room cool and dark."),
    ("Tell me a fun fact.", "Octopuses have three hearts and blue blood."),
    ("What should I cook tonight?", "How about a simple stir-fry with vegetables and rice?"),
    ("I'm a bit bored.", "Maybe try a short walk, a new book, or a puzzle?"),
    ("Recommend a hobby.", "Drawing is a great hobby: cheap to start and relaxing."),
    ("What's a good name for a plant?", "How about Fernando the fern?"),
    ("Is it better to run in the morning or evening?", "Either works; the best time is the one you can stick to."),
    ("How do I stay focused?", "Work in short blocks with breaks, and put your phone in another room."),
    ("Say something encouraging.", "You're doing better than you think. Keep going!"),
]


def _has_word(text, word):
    return re.search(r"(?<![\w])" + re.escape(word.lower()) + r"(?![\w])", text.lower()) is not None


class Memory(GeneratedTask):
    """`filler_turns` = (min, max) user/assistant exchanges between the fact and the question."""

    def __init__(self, split="train", size=5000, filler_turns=(2, 8), decoy_prob=0.5, seed=0, **kwargs):
        super().__init__(split, size, seed, **kwargs)
        lo, hi = filler_turns
        if not 0 <= lo <= hi:
            raise ValueError(f"filler_turns must be (min, max) with 0 <= min <= max, got {filler_turns}")
        self.filler_turns, self.decoy_prob = (lo, hi), decoy_prob

    def _filler(self, rng):
        if rng.random() < 0.5:
            return rng.choice(_SMALL_TALK)
        a, op, b, c = make_problem(rng, 50)
        return f"Quick one: what is {a} {op} {b}?", f"{a} {op} {b} = {c}"

    def get_example(self, index):
        rng = example_rng(f"memory{self.seed}", self.split, index)
        kind = rng.choice(sorted(FACTS))
        state, ask, values = FACTS[kind]
        value = rng.choice(values)
        turns = [(f"By the way, {state.format(v=value)}.", rng.choice(_ACKS))]
        # a same-kind fact about someone else, placed anywhere in the filler: the near-miss to avoid
        n_filler = rng.randint(*self.filler_turns)
        filler = [self._filler(rng) for _ in range(n_filler)]
        decoy = None
        if rng.random() < self.decoy_prob:
            decoy = rng.choice([v for v in values if v != value])
            owner = rng.choice(_DECOY_OWNERS)
            decoy_stmt = state.replace("my ", owner + " ", 1) if state.startswith("my ") else None
            if decoy_stmt is None:  # "I was born in" has no owner slot
                decoy_stmt = f"{owner} home town is {{v}}"
            filler.insert(rng.randint(0, len(filler)), (f"Also, {decoy_stmt.format(v=decoy)}.", rng.choice(_ACKS)))
        turns += filler
        answer_text = {"colour": "Your favourite colour is {v}.", "pet": "Your dog is called {v}.",
                       "city": "You were born in {v}.", "number": "Your lucky number is {v}.",
                       "food": "Your favourite food is {v}."}[kind].format(v=value)
        messages = []
        for u, a in turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer_text}]
        return {"messages": messages, "kind": kind, "answer": value, "decoy": decoy}

    def evaluate(self, conversation, completion):
        """Right value named, and no other value of the same kind (the decoy included)."""
        values = FACTS[conversation["kind"]][2]
        answer = conversation["answer"]
        if not _has_word(completion, answer):
            return False
        return not any(_has_word(completion, v) for v in values if v != answer)
