"""
HumanEval: write a Python function from its signature and docstring; scored by running the
dataset's unit tests on the completion in a separate Python process with a time limit.
Needs the Hugging Face dataset openai/openai_humaneval (online or cached).
"""
import re
import subprocess
import sys
import tempfile

from tasks.common import Task, load_hf_dataset

_FENCE_RE = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


def extract_program(completion):
    """The code in the first ```python fence if there is one, else the whole completion."""
    m = _FENCE_RE.search(completion)
    return m.group(1) if m else completion


def run_python(program, timeout=10.0):
    """Run `program` in a fresh interpreter; True when it exits 0 within `timeout` seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=True) as f:
        f.write(program)
        f.flush()
        try:
            r = subprocess.run([sys.executable, "-I", f.name], capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


class HumanEval(Task):
    def __init__(self, split="test", **kwargs):
        super().__init__(**kwargs)
        self.ds = load_hf_dataset("openai/openai_humaneval", None, split, task="HumanEval")

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        conv = {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}]}
        conv.update(prompt=row["prompt"], test=row["test"], entry_point=row["entry_point"])
        return conv

    def evaluate(self, conversation, completion):
        code = extract_program(completion)
        if f"def {conversation['entry_point']}" not in code:
            code = conversation["prompt"] + code  # the model continued the body only
        program = f"{code}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"
        return run_python(program)
