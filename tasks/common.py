"""
What every task shares: the Task base class (a lazily indexed, sliceable list of conversations),
TaskMixture (a deterministic shuffle of several tasks, for training), TaskSequence (tasks one after
another, for curricula), the multiple-choice prompt, answer extraction, and the one place that
loads a Hugging Face dataset, so that offline use fails fast with one clear line.

A conversation is a dict: {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}.
Eval tasks also keep what evaluate() needs (e.g. "letters" for multiple choice) in the dict; the
tokenizer only reads "messages".
"""
import os
import random
import re

from nanochat.common import UserError

# The code-made tasks that need no download; the hub tasks need the internet (or a cached copy).
OFFLINE_TASKS = ("Arithmetic", "Spelling", "Memory", "Identity")
HUB_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")


class Task:
    """
    A list of conversations, indexed lazily. `start/stop/step` take a slice of the underlying
    examples (e.g. a held-out head of a split). Subclasses implement num_examples(),
    get_example(i) and, for eval tasks, eval_type and evaluate(conversation, completion).
    """
    eval_type = "generative"  # "generative": sample and score text; "categorical": pick a letter

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, completion):
        """Score one completion (the assistant's reply text) against the reference: True/False."""
        raise NotImplementedError(f"{type(self).__name__} is a training task without a scorer")

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range ({n} examples)")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture(Task):
    """
    Several tasks shuffled together with a fixed seed, so every rank and every resume sees the same
    order. A task listed twice is simply seen twice per epoch (that is how to upweight it).
    """

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.index_map = [(ti, ei) for ti, t in enumerate(self.tasks) for ei in range(len(t))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        ti, ei = self.index_map[index]
        return self.tasks[ti][ei]


class TaskSequence(Task):
    """Tasks one after another, in order (a curriculum: all of the first, then the second, ...)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.offsets = [0]
        for t in self.tasks:
            self.offsets.append(self.offsets[-1] + len(t))

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        for ti, t in enumerate(self.tasks):
            if index < self.offsets[ti + 1]:
                return t[index - self.offsets[ti]]
        raise IndexError(index)


class GeneratedTask(Task):
    """A task made by code: `size` examples per split, each drawn by example_rng(seed, split, index)."""

    def __init__(self, split="train", size=1000, seed=0, **kwargs):
        super().__init__(**kwargs)
        example_rng(seed, split, 0)  # validates the split name
        self.split, self.size, self.seed = split, size, seed

    def num_examples(self):
        return self.size


def example_rng(seed, split, index):
    """
    The random generator of one code-made example: a pure function of (seed, split, index), so an
    example is the same whatever order examples are asked for, and train and test never share a
    stream.
    """
    split_salt = {"train": 0, "val": 1, "test": 2}
    if split not in split_salt:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    return random.Random(f"{seed}/{split}/{index}")


def user_assistant(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# ------------------------------------------------------------------ multiple choice
LETTERS = "ABCDEFGHIJ"


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt (nanochat's format). The letter comes *after* its choice ("- Paris=A")
    so a small model reads the content before the label it must emit.
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "\n".join(lines)


# ------------------------------------------------------------------ answer extraction
_FINAL_RE = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_final_number(text):
    """The number after the last '####' marker (GSM8K style), commas removed; None if absent."""
    matches = _FINAL_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def numbers_equal(a, b):
    """Exact numeric equality of two number strings ('68' == '68.0', '68' != '680')."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------ Hugging Face datasets
def hub_offline():
    """True when the user asked Hugging Face libraries to stay off the network."""
    truthy = ("1", "true", "yes", "on")
    return any(os.environ.get(v, "").lower() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hf_dataset(path, name=None, split="train", task="this task"):
    """
    datasets.load_dataset, with a clear UserError instead of a traceback (or a hang) when the data
    cannot be had. With HF_HUB_OFFLINE=1 only an already cached copy is used and a missing one
    fails at once (datasets reads the variable at import time, so we re-apply it here in case it
    was set after the import).
    """
    offline = hub_offline()
    try:
        import datasets
        if offline:
            datasets.config.HF_HUB_OFFLINE = True
            try:
                import huggingface_hub.constants as hub_constants
                hub_constants.HF_HUB_OFFLINE = True
            except ImportError:
                pass
        return datasets.load_dataset(path, name, split=split)
    except Exception as e:  # network, missing cache, bad split: all become one line for the user
        why = "HF_HUB_OFFLINE=1 and no cached copy" if offline else f"{type(e).__name__}: {e}"
        raise UserError(
            f"{task} needs the Hugging Face dataset {path}{'/' + name if name else ''} ({split}), "
            f"which could not be loaded ({why}). These tasks need the internet or a cached copy; "
            f"the offline tasks are {', '.join(OFFLINE_TASKS)}") from None
