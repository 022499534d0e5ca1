"""chat_eval and base_eval: the scoring plumbing against oracle models, the CLI, the report, offline errors."""
import os

import pytest
import torch

from nanochat.common import UserError
from tasks.common import Task
from test_mid_train import make_base_checkpoint
from test_tasks import offline_hub


class OracleGPT(torch.nn.Module):
    """
    A stand-in GPT that 'knows' the answer to each prompt: after a known prompt it emits the scripted
    reply tokens (then <|assistant_end|>), one per step through the Engine's KV cache; in a batched
    forward it puts all mass on the scripted first token at each row's last prompt position.
    """

    def __init__(self, tok, scripts):
        super().__init__()
        self.vocab = tok.get_vocab_size()
        self.scripts = {tuple(p): list(r) for p, r in scripts.items()}
        self.pad = tok.get_bos_token_id()
        self.config = type("C", (), {"sequence_len": 256})()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.current = None

    def get_device(self):
        return self.dummy.device

    def new_kv_cache(self, batch_size=1, seq_len=256, dtype=None):
        from nanochat.gpt import KVCache
        return KVCache(batch_size, 1, 2, 1, seq_len)

    def _onehot(self, token):
        v = torch.full((self.vocab,), -30.0)
        v[token] = 30.0
        return v

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        if kv_cache is not None:
            if kv_cache.pos == 0:  # prefill: remember which prompt this is
                self.current, self.prompt_len = self.scripts[tuple(ids[0].tolist())], T
            step = kv_cache.pos + T - self.prompt_len
            kv_cache.pos += T
            for b in range(B):
                logits[b, -1] = self._onehot(self.current[min(step, len(self.current) - 1)])
            return logits
        for b in range(B):
            row = ids[b].tolist()
            for prompt, reply in self.scripts.items():
                n = len(prompt)
                if tuple(row[:n]) == prompt and all(t == self.pad for t in row[n:]):
                    logits[b, n - 1] = self._onehot(reply[0])
        return logits


class LetterTask(Task):
    eval_type = "categorical"

    def __init__(self):
        super().__init__()
        self.rows = [("Is the sky blue?", ["yes", "no"], "A"), ("2 + 2 = 5?", ["yes", "no"], "B"),
                     ("Pick C", ["x", "y", "z"], "C")]

    def num_examples(self):
        return len(self.rows)

    def get_example(self, i):
        from tasks.common import render_mc, LETTERS
        q, choices, ans = self.rows[i]
        letters = list(LETTERS[:len(choices)])
        return {"messages": [{"role": "user", "content": render_mc(q, letters, choices)},
                             {"role": "assistant", "content": ans}], "letters": letters}

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]


def _oracle(tok, task, reply_fn):
    end = tok.encode_special("<|assistant_end|>")
    scripts = {}
    for conv in task:
        scripts[tuple(tok.render_for_completion(conv))] = tok.encode(reply_fn(conv)) + [end]
    return OracleGPT(tok, scripts)


@pytest.mark.parametrize("task_name", ["Arithmetic", "Spelling", "Memory", "Identity"])
def test_generative_eval_exact_with_oracle(tiny_base_env, task_name):
    from nanochat.tokenizer import get_tokenizer
    from scripts.chat_eval import load_task, run_chat_eval
    tok = get_tokenizer()
    task = load_task(task_name)
    task.stop = 12  # a handful of problems
    right = _oracle(tok, task, lambda c: c["messages"][-1]["content"])
    assert run_chat_eval(task_name, right, tok, task=task, max_new_tokens=200, quiet=True) == 1.0
    wrong = _oracle(tok, task, lambda c: "I don't know, maybe #### 123456789 and I am ChatGPT")
    assert run_chat_eval(task_name, wrong, tok, task=task, max_new_tokens=200, quiet=True) == 0.0
    # partly right: prompts of even length get the reference, the others a wrong reply
    even = lambda c: len(tok.render_for_completion(c)) % 2 == 0
    expected = sum(map(even, task)) / len(task)
    assert 0 < expected < 1
    part = _oracle(tok, task, lambda c: c["messages"][-1]["content"] if even(c) else "no")
    assert run_chat_eval(task_name, part, tok, task=task, max_new_tokens=200, quiet=True) == pytest.approx(expected)
    assert run_chat_eval(task_name, right, tok, task=task, max_new_tokens=200, quiet=True, max_problems=3) == 1.0


def test_categorical_eval_with_oracle(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    from scripts.chat_eval import run_categorical_eval, chance_level
    tok = get_tokenizer()
    task = LetterTask()
    right = _oracle(tok, task, lambda c: c["messages"][-1]["content"])
    assert run_categorical_eval(task, tok, right, batch_size=2, quiet=True) == 1.0
    # the oracle of the first problem's answer everywhere: right once (only 'A' problems)
    always_a = _oracle(tok, task, lambda c: "A")
    assert run_categorical_eval(task, tok, always_a, batch_size=3, quiet=True) == pytest.approx(1 / 3)
    assert chance_level(task) == 0.5


def test_parse_task_names():
    from scripts.chat_eval import parse_task_names
    assert parse_task_names("offline") == ["Arithmetic", "Spelling", "Memory", "Identity"]
    assert parse_task_names("Memory|ARC-Easy|Memory") == ["Memory", "ARC-Easy"]
    assert len(parse_task_names("all")) == 9
    with pytest.raises(UserError, match="unknown task 'Arith'"):
        parse_task_names("Arith")


def _make_sft(base_dir):
    """A tiny 'sft' checkpoint: the random base model saved where chat_sft would put it."""
    import shutil
    make_base_checkpoint(base_dir)
    shutil.copytree(os.path.join(base_dir, "base_checkpoints"), os.path.join(base_dir, "chatsft_checkpoints"))


def test_chat_eval_cli_and_report(tiny_base_env, capsys):
    from scripts import chat_eval
    _make_sft(tiny_base_env)
    results = chat_eval.main(["-i", "sft", "-a", "offline", "-x", "2", "-m", "8", "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert set(results) == {"Arithmetic", "Spelling", "Memory", "Identity"}
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert "ChatCORE" in out and "Arithmetic |" in out
    text = open(os.path.join(tiny_base_env, "report", "chat-evaluation-sft.md")).read()
    assert "- Arithmetic: " in text and "- ChatCORE metric: " in text


def test_chat_eval_hub_task_offline_error(tiny_base_env, monkeypatch, tmp_path):
    from scripts import chat_eval
    _make_sft(tiny_base_env)
    offline_hub(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="MMLU needs the Hugging Face dataset cais/mmlu.*HF_HUB_OFFLINE=1"):
        chat_eval.main(["-i", "sft", "-a", "Arithmetic|MMLU", "--device-type", "cpu"])
    with pytest.raises(UserError, match="no mid checkpoints"):
        chat_eval.main(["-i", "mid", "-a", "Arithmetic", "--device-type", "cpu"])


# ------------------------------------------------------------------ base_eval
def test_cloze_items_deterministic_and_correct(tiny_base_env):
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import get_tokenizer
    from scripts.base_eval import make_cloze_items
    tok = get_tokenizer()
    texts = [t for b in parquets_iter_batched("val") for t in b]
    items = make_cloze_items(texts, tok, 20, context_tokens=16, continuation_tokens=4, num_choices=3, seed=1)
    assert items == make_cloze_items(texts, tok, 20, 16, 4, 3, seed=1)
    assert items != make_cloze_items(texts, tok, 20, 16, 4, 3, seed=2)
    docs = [d for d in tok.encode(texts, prepend=tok.get_bos_token_id()) if len(d) >= 21]
    answers = set()
    for k, it in enumerate(items):
        doc = docs[k % len(docs)]
        assert it["context"] == doc[:17] and it["choices"][it["answer"]] == doc[17:21]
        assert len(it["choices"]) == 3 and all(len(c) == 4 for c in it["choices"])
        assert len({tuple(c) for c in it["choices"]}) == 3
        answers.add(it["answer"])
    assert answers == {0, 1, 2}  # the true continuation is not always in the same slot


def test_cloze_accuracy_matches_manual_argmin(tiny_base_env):
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import get_tokenizer
    from scripts.base_eval import make_cloze_items, cloze_accuracy
    tok = get_tokenizer()
    model = make_base_checkpoint(tiny_base_env, seed=3).eval()
    texts = [t for b in parquets_iter_batched("val") for t in b]
    items = make_cloze_items(texts, tok, 12, 8, 4, 4)
    manual = 0
    with torch.no_grad():
        for it in items:
            scores = []
            for c in it["choices"]:
                logp = torch.log_softmax(model(torch.tensor([it["context"] + c]))[0], -1)
                n = len(it["context"])
                scores.append(-sum(logp[n - 1 + j, c[j]].item() for j in range(len(c))))
            manual += int(min(range(4), key=scores.__getitem__) == it["answer"])
    assert cloze_accuracy(model, items) == (manual, 12)
    assert cloze_accuracy(model, items, indices=[]) == (0, 0)


def test_base_eval_cli(tiny_base_env, capsys):
    from scripts import base_eval
    make_base_checkpoint(tiny_base_env)
    results = base_eval.main(["--device-type", "cpu", "--device-batch-size", "2", "--eval-tokens", "256",
                              "--cloze-items", "8", "--cloze-context", "8", "--max-new-tokens", "4"])
    assert 0 < results["Validation bpb"] < 20
    assert 0 <= results["Cloze accuracy (4 choices)"] <= 1
    text = open(os.path.join(tiny_base_env, "report", "base-model-evaluation.md")).read()
    assert "- Validation bpb: " in text and "Samples (greedy)" in text
