"""
Spelling and letter counting: "spell 'banana'" -> "b-a-n-a-n-a", and "how many 'a' in 'banana'?"
-> spell it out, count along, then '#### 3'. Tokenizers hide letters inside tokens; these teach the
model to look inside them. The word list is built in (no download).
"""
from tasks.common import GeneratedTask, example_rng, user_assistant, extract_final_number, numbers_equal

WORDS = """
apple banana cherry orange grape lemon melon peach pear plum mango papaya strawberry blueberry
raspberry coconut avocado tomato potato carrot pepper onion garlic ginger celery lettuce spinach
river mountain forest desert ocean island valley canyon meadow glacier volcano harbor lagoon
window kitchen garden bedroom hallway library school hospital museum theater station airport
bicycle rocket engine tractor bus train subway ferry sailboat helicopter scooter wagon
elephant giraffe kangaroo penguin dolphin octopus squirrel rabbit turtle parrot tiger zebra
computer keyboard monitor printer network program memory context compression summary language
teacher doctor farmer painter writer singer dancer pilot sailor baker butcher plumber
happiness kindness freedom balance courage patience wisdom silence harmony mystery
yellow purple silver golden crimson scarlet emerald violet turquoise lavender
pencil notebook scissors envelope umbrella blanket pillow mirror candle basket bottle ladder
mississippi committee bookkeeper balloon coffee letter address success possess assessment
""".split()

_SPELL_TEMPLATES = [
    "Spell the word '{w}'.",
    "How do you spell {w}?",
    "spell {w} letter by letter",
    "Can you spell '{w}' for me?",
]
_COUNT_TEMPLATES = [
    "How many '{c}' are in the word '{w}'?",
    "How many times does the letter {c} appear in {w}?",
    "count the letter '{c}' in '{w}'",
    "In the word {w}, how many {c}'s are there?",
]


def spell(word):
    return "-".join(word)


def count_solution(word, letter):
    """Spell the word, keep a running count at each match, end with '#### n'."""
    n, steps = 0, []
    for ch in word:
        if ch == letter:
            n += 1
            steps.append(f"{ch} ({n})")
        else:
            steps.append(ch)
    return f"Spelling it out: {', '.join(steps)}.\nThe letter '{letter}' appears {n} times.\n#### {n}", n


class Spelling(GeneratedTask):
    """Half the examples spell a word, half count a letter (a letter of the word 3 times in 4)."""

    def __init__(self, split="train", size=10000, seed=0, **kwargs):
        super().__init__(split, size, seed, **kwargs)

    def get_example(self, index):
        rng = example_rng(f"spell{self.seed}", self.split, index)
        word = rng.choice(WORDS)
        if index % 2 == 0:
            conv = user_assistant(rng.choice(_SPELL_TEMPLATES).format(w=word), spell(word))
            conv.update(kind="spell", answer=spell(word))
        else:
            letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            reply, n = count_solution(word, letter)
            conv = user_assistant(rng.choice(_COUNT_TEMPLATES).format(c=letter, w=word), reply)
            conv.update(kind="count", answer=str(n))
        return conv

    def evaluate(self, conversation, completion):
        if conversation["kind"] == "spell":
            # exact letters in order; whitespace and a final period are forgiven, nothing else
            return completion.strip().rstrip(".").strip() == conversation["answer"]
        got = extract_final_number(completion)
        return got is not None and numbers_equal(got, conversation["answer"])
