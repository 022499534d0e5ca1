"""
SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for midtraining and SFT.
A leading system message is folded into the first user turn (the chat format has no system role).
"""
from tasks.common import Task, load_hf_dataset


class SmolTalk(Task):
    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        self.ds = load_hf_dataset("HuggingFaceTB/smol-smoltalk", None, split, task="SmolTalk").shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        messages = [dict(role=m["role"], content=m["content"]) for m in self.ds[index]["messages"]]
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
            if messages and messages[0]["role"] == "user":
                messages[0]["content"] = system + "\n\n" + messages[0]["content"]
        return {"messages": messages}
