"""
ARC (AI2 Reasoning Challenge), Easy and Challenge: grade-school science, multiple choice.
Needs the Hugging Face dataset allenai/ai2_arc (online or cached).
"""
from tasks.common import Task, render_mc, load_hf_dataset


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
        self.ds = load_hf_dataset("allenai/ai2_arc", subset, split, task=subset).shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        letters, choices = row["choices"]["label"], row["choices"]["text"]
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {index}: answer {answer!r} not among {letters}")
        conv = {"messages": [{"role": "user", "content": render_mc(row["question"], letters, choices)},
                             {"role": "assistant", "content": answer}]}
        conv["letters"] = letters
        return conv

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]
