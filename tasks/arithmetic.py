"""
Arithmetic: add, subtract or multiply two small numbers. Code-made and seeded, so it works
offline; scored by exact match of the final number after '####' (GSM8K's convention, so a model
that learns the format here can carry it to GSM8K).
"""
from tasks.common import GeneratedTask, example_rng, user_assistant, extract_final_number, numbers_equal

_TEMPLATES = [
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "Please calculate {a} {op} {b}",
    "what's {a}{op}{b}",
    "Can you tell me the result of {a} {op} {b}?",
]
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_problem(rng, max_value):
    op = rng.choice(list(_OPS))
    hi = max_value if op != "*" else max(2, int(max_value ** 0.5) * 2)  # keep products small
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return a, op, b, _OPS[op](a, b)


class Arithmetic(GeneratedTask):
    """`size` examples per split; operands in [0, max_value] (smaller for multiplication)."""

    def __init__(self, split="train", size=10000, max_value=99, seed=0, **kwargs):
        super().__init__(split, size, seed, **kwargs)
        self.max_value = max_value

    def get_example(self, index):
        rng = example_rng(f"arith{self.seed}", self.split, index)
        a, op, b, c = make_problem(rng, self.max_value)
        question = rng.choice(_TEMPLATES).format(a=a, op=op, b=b)
        conv = user_assistant(question, f"{a} {op} {b} = {c}\n#### {c}")
        conv["answer"] = str(c)
        return conv

    def evaluate(self, conversation, completion):
        """Exact match: the last '####' number must equal the answer ('#### 680' for 68 fails)."""
        got = extract_final_number(completion)
        return got is not None and numbers_equal(got, conversation["answer"])
