"""
MMLU: 57 subjects of multiple-choice questions. `subset="auxiliary_train"` is the large training
split nanochat midtrains on; `all` with split test/validation is the eval.
Needs the Hugging Face dataset cais/mmlu (online or cached).
"""
from tasks.common import Task, render_mc, load_hf_dataset, LETTERS


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset="all", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be all or auxiliary_train, got {subset!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU auxiliary_train only has a train split")
        self.subset = subset
        self.ds = load_hf_dataset("cais/mmlu", subset, split, task="MMLU").shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        if self.subset == "auxiliary_train" and "train" in row:  # this split nests each row once
            row = row["train"]
        choices = row["choices"]
        letters = list(LETTERS[:len(choices)])
        conv = {"messages": [{"role": "user", "content": render_mc(row["question"], letters, choices)},
                             {"role": "assistant", "content": letters[row["answer"]]}]}
        conv["letters"] = letters
        conv["subject"] = row.get("subject", "")
        return conv

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]
