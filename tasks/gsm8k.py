"""
GSM8K: grade-school math word problems; the reference ends with '#### <number>'.
Calculator annotations like <<48/2=24>> are removed (this stack has no tool use yet).
Needs the Hugging Face dataset openai/gsm8k (online or cached).
"""
import re

from tasks.common import Task, load_hf_dataset, extract_final_number, numbers_equal

_CALC_RE = re.compile(r"<<[^>]*>>")


class GSM8K(Task):
    def __init__(self, subset="main", split="test", **kwargs):
        super().__init__(**kwargs)
        self.ds = load_hf_dataset("openai/gsm8k", subset, split, task="GSM8K").shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        answer = _CALC_RE.sub("", row["answer"])
        conv = {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": answer}]}
        conv["answer"] = extract_final_number(answer)
        return conv

    def evaluate(self, conversation, completion):
        got = extract_final_number(completion)
        return got is not None and numbers_equal(got, conversation["answer"])
