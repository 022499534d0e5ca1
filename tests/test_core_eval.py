"""
CORE (nanochat/core_eval.py, base_eval --core): a tiny eval bundle in the real bundle's format, written in-process
(one task of each type), checked against reference computations; the bundle download with a fake urlopen only.
Nothing here touches the network.
"""
import csv
import io
import json
import math
import os
import random
import shutil
import urllib.error
import urllib.request
import zipfile
from types import SimpleNamespace

import pytest
import torch

from nanochat.common import UserError
from nanochat.core_eval import (EVAL_BUNDLE_URL, centered_accuracy, crop_left, ensure_eval_bundle, evaluate_core,
                                fewshot_indices, load_bundle, load_task_data, render_prompts, tokenize_prompts)

MC = [
    {"query": "Question: What is the capital of France?", "choices": ["Paris", "London", "Rome", "Berlin"],
     "gold": 0},
    {"query": "Question: How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "gold": 1},
    {"query": "Question: Which one is a colour?", "choices": ["seven", "door", "red", "king"], "gold": 2},
    {"query": "Question: What do bees make?", "choices": ["milk", "silk", "wool", "honey"], "gold": 3},
]
SCHEMA = [
    {"context_options": ["The crown did not fit in the box because the crown",
                         "The crown did not fit in the box because the box"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["Anna thanked Beth because Anna", "Anna thanked Beth because Beth"],
     "continuation": "had helped her.", "gold": 1},
    {"context_options": ["The king hid the key under the door because the key",
                         "The king hid the key under the door because the door"],
     "continuation": "was small.", "gold": 0},
]
LM = [  # some contexts carry stray whitespace, as in the real bundle
    {"context": "One, two, three, four,", "continuation": "five"},
    {"context": "The opposite of hot is  ", "continuation": "cold"},
    {"context": "Monday, Tuesday,", "continuation": "Wednesday"},
    {"context": "\nA B C D", "continuation": "E"},
]
CORE_YAML = """\
icl_tasks:
-
  label: toy_mc
  dataset_uri: toy/mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
-
  label: toy_schema
  dataset_uri: toy/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
-
  label: toy_lm
  dataset_uri: toy/lm.jsonl
  num_fewshot: [2]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""
BASELINES = {"toy_mc": 25.0, "toy_schema": 50.0, "toy_lm": 0.0}


def make_bundle(root):
    """An eval bundle like the real one (core.yaml, eval_meta_data.csv, eval_data/**.jsonl) at root; returns it."""
    root = str(root)
    os.makedirs(os.path.join(root, "eval_data", "toy"))
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write(CORE_YAML)
    with open(os.path.join(root, "eval_meta_data.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "Random baseline", "Centered Metric?",
                    "Description"])
        for label, b in BASELINES.items():
            w.writerow([label, "toy", "toy", 0, b, "yes", f"a toy task, {label}"])
    for name, rows in (("mc", MC), ("schema", SCHEMA), ("lm", LM)):
        with open(os.path.join(root, "eval_data", "toy", f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle")


def shuffled(rows):
    rows = [dict(r) for r in rows]
    random.Random(1337).shuffle(rows)  # nanochat's subsampling seed
    return rows


# ------------------------------------------------------------------ reading the bundle, rendering
def test_load_bundle_and_data(bundle):
    tasks = load_bundle(bundle)
    assert [(t["label"], t["task_type"], t["num_fewshot"], t["continuation_delimiter"], t["random_baseline"])
            for t in tasks] == [("toy_mc", "multiple_choice", 1, "\nAnswer: ", 25.0),
                                ("toy_schema", "schema", 1, " ", 50.0),
                                ("toy_lm", "language_modeling", 2, " ", 0.0)]
    assert tasks[2]["path"] == os.path.join(bundle, "eval_data", "toy", "lm.jsonl")
    assert load_task_data(tasks[0]) == shuffled(MC)
    assert load_task_data(tasks[0], max_per_task=2) == shuffled(MC)[:2]
    assert load_task_data(tasks[2], max_per_task=-1) == shuffled(LM)


def test_bad_bundles(tmp_path):
    with pytest.raises(UserError, match="is not a CORE eval bundle"):
        load_bundle(str(tmp_path))
    root = make_bundle(tmp_path / "b")
    text = open(os.path.join(root, "core.yaml")).read()
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write(text.replace("label: toy_lm", "label: toy_unknown"))
    with pytest.raises(UserError, match="toy_unknown has no row in"):
        load_bundle(root)
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write(text.replace("icl_task_type: schema", "icl_task_type: generation_task_with_answers"))
    with pytest.raises(UserError, match="unsupported icl_task_type 'generation_task_with_answers'"):
        load_bundle(root)


def test_render_prompts_each_type():
    assert render_prompts(MC[0], "multiple_choice", "\nAnswer: ", [MC[1]]) == [
        "Question: How many legs does a spider have?\nAnswer: eight\n\n"
        f"Question: What is the capital of France?\nAnswer: {c}" for c in ["Paris", "London", "Rome", "Berlin"]]
    assert render_prompts(MC[2], "multiple_choice", " ", []) == [
        "Question: Which one is a colour? seven", "Question: Which one is a colour? door",
        "Question: Which one is a colour? red", "Question: Which one is a colour? king"]
    assert render_prompts(SCHEMA[1], "schema", " ", [SCHEMA[0]]) == [
        "The crown did not fit in the box because the crown was too big.\n\n"
        "Anna thanked Beth because Anna had helped her.",
        "The crown did not fit in the box because the crown was too big.\n\n"
        "Anna thanked Beth because Beth had helped her."]
    # language modeling: contexts stripped; the prompt without the continuation stripped too
    assert render_prompts(LM[1], "language_modeling", " ", [LM[3], LM[0]]) == [
        "A B C D E\n\nOne, two, three, four, five\n\nThe opposite of hot is",
        "A B C D E\n\nOne, two, three, four, five\n\nThe opposite of hot is cold"]
    assert render_prompts(LM[3], "language_modeling", "\nAnswer: ", []) == ["A B C D\nAnswer:", "A B C D\nAnswer: E"]


def test_fewshot_indices():
    for n, k in [(4, 1), (4, 2), (9, 3)]:
        for idx in range(n):
            others = [i for i in range(n) if i != idx]
            assert fewshot_indices(n, idx, k) == random.Random(1234 + idx).sample(others, k)
            assert idx not in fewshot_indices(n, idx, k)
    assert fewshot_indices(4, 0, 0) == []
    assert sorted(fewshot_indices(3, 1, 10)) == [0, 2]  # a small cap: every other example, no error


def test_token_spans(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    bos = tok.get_bos_token_id()
    prompts = render_prompts(MC[0], "multiple_choice", "\nAnswer: ", [MC[1]])
    rows, starts, ends = tokenize_prompts(tok, prompts, "multiple_choice")
    ref = [tok.encode(p, prepend=bos) for p in prompts]
    s = len(os.path.commonprefix(ref))
    assert rows == ref and starts == [s] * 4 and ends == [len(r) for r in ref]
    assert len({tuple(r[s:]) for r in rows}) == 4  # the scored tails tell the choices apart
    prompts = render_prompts(SCHEMA[0], "schema", " ", [SCHEMA[1]])
    rows, starts, ends = tokenize_prompts(tok, prompts, "schema")
    ref = [tok.encode(p, prepend=bos) for p in prompts]
    k = len(os.path.commonprefix([r[::-1] for r in ref]))
    assert rows == ref and starts == [len(r) - k for r in ref] and ends == [len(r) for r in ref]
    assert rows[0][starts[0]:] == rows[1][starts[1]:] and k > 0
    prompts = render_prompts(LM[1], "language_modeling", " ", [LM[0]])
    rows, starts, ends = tokenize_prompts(tok, prompts, "language_modeling")
    without, with_ = tok.encode(prompts[0], prepend=bos), tok.encode(prompts[1], prepend=bos)
    assert rows == [with_] and starts == [len(without)] and ends == [len(with_)]
    assert tok.decode(with_[len(without):]).strip() == "cold"


def test_crop_left():
    rows = [list(range(10)), list(range(4))]
    assert crop_left(rows, [6, 2], [10, 4], 6) == ([[4, 5, 6, 7, 8, 9], [0, 1, 2, 3]], [2, 2], [6, 4])
    assert crop_left(rows, [2, 2], [10, 4], 6) == ([[4, 5, 6, 7, 8, 9], [0, 1, 2, 3]], [1, 2], [6, 4])
    assert crop_left(rows, [6, 2], [10, 4], 100) == (rows, [6, 2], [10, 4])


# ------------------------------------------------------------------ scoring with a stand-in model
class OracleLM(torch.nn.Module):
    """
    A stand-in GPT: a row (trailing <|bos|> padding aside) that is a known-good sequence, or the left-cropped tail
    of one, gets all its next tokens predicted with high confidence; every other row gets uniform logits.
    """

    def __init__(self, vocab, good, pad, seq_len=100_000):
        super().__init__()
        self.vocab, self.pad, self.good = vocab, pad, [list(g) for g in good]
        self.config = SimpleNamespace(sequence_len=seq_len)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.longest = 0

    def get_device(self):
        return self.dummy.device

    def forward(self, ids):
        B, T = ids.shape
        self.longest = max(self.longest, T)
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            r = ids[b].tolist()
            while r and r[-1] == self.pad:
                r.pop()
            if any(len(g) >= len(r) and g[len(g) - len(r):] == r for g in self.good):
                for t in range(len(r) - 1):
                    logits[b, t, r[t + 1]] = 20.0
        return logits


def oracle_sequences(tok, tasks, pick, max_per_task=-1):
    """The full token rows an oracle should favour: per example, the prompt of candidate pick(task, idx, item)
    (language modeling: the prompt with the continuation, when pick is not None)."""
    good = []
    for task in tasks:
        data = load_task_data(task, max_per_task)
        for idx, item in enumerate(data):
            choice = pick(task, idx, item)
            if choice is None:
                continue
            shots = [data[i] for i in fewshot_indices(len(data), idx, task["num_fewshot"])]
            prompts = render_prompts(item, task["task_type"], task["continuation_delimiter"], shots)
            lm = task["task_type"] == "language_modeling"
            good.append(tok.encode(prompts[-1] if lm else prompts[choice], prepend=tok.get_bos_token_id()))
    return good


def pick_every_other(task, idx, item):
    """The gold candidate for even idx, a wrong one for odd idx (language modeling: nothing for odd idx)."""
    if task["task_type"] == "language_modeling":
        return 0 if idx % 2 == 0 else None
    n = len(item["choices"] if task["task_type"] == "multiple_choice" else item["context_options"])
    return item["gold"] if idx % 2 == 0 else (item["gold"] + 1) % n


def test_oracle_scores_exact(tiny_base_env, bundle):
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    tasks = load_bundle(bundle)
    gold = oracle_sequences(tok, tasks, lambda task, idx, item: item.get("gold", 0))
    right = OracleLM(tok.get_vocab_size(), gold, tok.get_bos_token_id())
    core = evaluate_core(right, tok, bundle, progress=False)
    assert core["results"] == {"toy_mc": 1.0, "toy_schema": 1.0, "toy_lm": 1.0}
    assert core["centered_results"] == {"toy_mc": 1.0, "toy_schema": 1.0, "toy_lm": 1.0}
    assert core["core_metric"] == 1.0
    assert [t["num_examples"] for t in core["tasks"]] == [4, 3, 4]
    # cropped from the left to a short window, the right answers still win
    short = OracleLM(tok.get_vocab_size(), gold, tok.get_bos_token_id(), seq_len=24)
    assert max(len(g) for g in gold) > 24
    assert evaluate_core(short, tok, bundle, progress=False)["core_metric"] == 1.0
    assert short.longest == 24

    mixed = OracleLM(tok.get_vocab_size(), oracle_sequences(tok, tasks, pick_every_other), tok.get_bos_token_id())
    core = evaluate_core(mixed, tok, bundle, progress=False)
    acc = {"toy_mc": 2 / 4, "toy_schema": 2 / 3, "toy_lm": 2 / 4}
    centered = {k: (acc[k] - 0.01 * BASELINES[k]) / (1 - 0.01 * BASELINES[k]) for k in acc}
    assert core["results"] == acc
    assert core["centered_results"] == centered
    assert core["core_metric"] == sum(centered.values()) / 3
    assert centered_accuracy(0.25, 25.0) == 0.0 and centered_accuracy(0.4, 0.0) == 0.4
    # a per-task cap scores the first examples of the seeded shuffle, with demonstrations drawn from those alone
    good = oracle_sequences(tok, tasks, pick_every_other, max_per_task=2)
    capped = evaluate_core(OracleLM(tok.get_vocab_size(), good, tok.get_bos_token_id()), tok, bundle,
                           max_per_task=2, progress=False)
    assert capped["results"] == {"toy_mc": 0.5, "toy_schema": 0.5, "toy_lm": 0.5}


# ------------------------------------------------------------------ a real (tiny, random) GPT
def tiny_gpt(vocab, seq_len=256, seed=0):
    from nanochat.gpt import GPT, config_from_depth
    torch.manual_seed(seed)
    model = GPT(config_from_depth(1, vocab, seq_len, aspect_ratio=32, head_dim=16))
    model.init_weights()
    return model.eval()


@torch.no_grad()
def reference_correct(model, tok, data, idx, task):
    """One prompt per forward, unpadded; spans from os.path.commonprefix; mean NLL from log_softmax."""
    item, kind = data[idx], task["task_type"]
    shots = [data[i] for i in fewshot_indices(len(data), idx, task["num_fewshot"])]
    rows = [tok.encode(p, prepend=tok.get_bos_token_id())
            for p in render_prompts(item, kind, task["continuation_delimiter"], shots)]
    if kind == "language_modeling":
        s, row = len(rows[0]), rows[1]
        return model(torch.tensor([row]))[0, s - 1:-1].argmax(-1).tolist() == row[s:]
    if kind == "multiple_choice":
        spans = [(len(os.path.commonprefix(rows)), len(r)) for r in rows]
    else:
        k = len(os.path.commonprefix([r[::-1] for r in rows]))
        spans = [(len(r) - k, len(r)) for r in rows]
    nll = []
    for r, (s, e) in zip(rows, spans):
        logp = torch.log_softmax(model(torch.tensor([r]))[0].float(), -1)
        nll.append(-sum(logp[j - 1, r[j]].item() for j in range(s, e)) / (e - s))
    return min(range(len(nll)), key=nll.__getitem__) == item["gold"]


def test_tiny_gpt_end_to_end(tiny_base_env, bundle):
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    model = tiny_gpt(tok.get_vocab_size())
    core = evaluate_core(model, tok, bundle, progress=False)
    for task in core["tasks"]:
        data = load_task_data(task)
        expected = sum(reference_correct(model, tok, data, i, task) for i in range(len(data))) / len(data)
        assert core["results"][task["label"]] == expected
        assert core["centered_results"][task["label"]] == centered_accuracy(expected, task["random_baseline"])
    assert math.isfinite(core["core_metric"])
    assert core["core_metric"] == sum(core["centered_results"].values()) / 3
    assert model.training is False


def _ddp_worker(rank, world_size, store, base_dir, bundle, good, out):
    import torch.distributed as dist
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        from nanochat.tokenizer import get_tokenizer
        tok = get_tokenizer()
        model = OracleLM(tok.get_vocab_size(), good, tok.get_bos_token_id())
        core = evaluate_core(model, tok, bundle, progress=False)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"results": core["results"], "core": core["core_metric"]}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_split_matches_single_process(tiny_base_env, bundle, tmp_path):
    import torch.multiprocessing as mp
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    good = oracle_sequences(tok, load_bundle(bundle), pick_every_other)
    single = evaluate_core(OracleLM(tok.get_vocab_size(), good, tok.get_bos_token_id()), tok, bundle, progress=False)
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), tiny_base_env, bundle, good, out), nprocs=2)
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            got = json.load(f)
        assert got == {"results": single["results"], "core": single["core_metric"]}


# ------------------------------------------------------------------ the bundle download (never the network)
def _bundle_zip_bytes(bundle):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for dirpath, _, names in os.walk(bundle):
            for name in names:
                path = os.path.join(dirpath, name)
                z.write(path, os.path.join("eval_bundle", os.path.relpath(path, bundle)))
    return buf.getvalue()


def _serve(monkeypatch, payload, calls):
    def fake_urlopen(url, timeout=None):
        calls.append(url)
        if isinstance(payload, Exception):
            raise payload
        return io.BytesIO(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_ensure_eval_bundle_fake_download(online, bundle, tmp_path, monkeypatch):
    base = tmp_path / "base"
    calls = []
    _serve(monkeypatch, _bundle_zip_bytes(bundle), calls)
    dest = ensure_eval_bundle(str(base))
    assert dest == str(base / "eval_bundle") and calls == [EVAL_BUNDLE_URL]
    assert load_bundle(dest)[0]["label"] == "toy_mc"
    assert open(os.path.join(dest, "eval_data", "toy", "lm.jsonl")).read() == "".join(json.dumps(r) + "\n" for r in LM)
    assert sorted(os.listdir(base)) == ["eval_bundle"]  # no temporary files left
    assert ensure_eval_bundle(str(base)) == dest and len(calls) == 1  # once


def test_ensure_eval_bundle_failures_leave_nothing(online, tmp_path, monkeypatch):
    base = tmp_path / "base"
    calls = []
    _serve(monkeypatch, b"<html>not a zip</html>", calls)
    with pytest.raises(UserError, match="not a zip file") as e:
        ensure_eval_bundle(str(base))
    assert "\n" not in str(e.value) and os.listdir(base) == []
    _serve(monkeypatch, urllib.error.URLError("[Errno -3] Temporary failure in name resolution"), calls)
    with pytest.raises(UserError) as e:
        ensure_eval_bundle(str(base))
    msg = str(e.value)
    assert "\n" not in msg and "download failed" in msg and EVAL_BUNDLE_URL in msg and "--core-bundle" in msg
    assert os.listdir(base) == []
    os.makedirs(base / "eval_bundle")
    with pytest.raises(UserError, match="exists but is not a CORE eval bundle"):
        ensure_eval_bundle(str(base))


def test_offline_env_refuses_without_trying(tmp_path, monkeypatch):
    calls = []
    _serve(monkeypatch, AssertionError("the network was touched"), calls)
    for var in ("NANOCHAT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv(var, "1")
        with pytest.raises(UserError, match=f"{var} is set") as e:
            ensure_eval_bundle(str(tmp_path / "base"))
        assert "\n" not in str(e.value)
    assert calls == []


# ------------------------------------------------------------------ base_eval
def test_resolve_core_bundle(tiny_base_env, bundle, monkeypatch, online):
    from scripts.base_eval import resolve_core_bundle
    calls = []
    _serve(monkeypatch, urllib.error.URLError("no network"), calls)
    assert resolve_core_bundle("off", bundle, "cpu") == (None, "off (--core off)")
    assert resolve_core_bundle("auto", bundle, "cpu") == (bundle, None)
    with pytest.raises(UserError, match="is not a CORE eval bundle"):
        resolve_core_bundle("on", os.path.join(bundle, "eval_data"), "cpu")
    path, note = resolve_core_bundle("auto", None, "cpu")  # not CUDA: no download, a note
    assert path is None and "not on CUDA" in note and calls == []
    path, note = resolve_core_bundle("auto", None, "cuda")  # CUDA: tries, and skips when offline
    assert path is None and note.startswith("skipped: ") and "download failed" in note and len(calls) == 1
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    path, note = resolve_core_bundle("auto", None, "cuda")
    assert path is None and "NANOCHAT_OFFLINE is set" in note and len(calls) == 1
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    _serve(monkeypatch, _bundle_zip_bytes(bundle), calls)
    assert resolve_core_bundle("on", None, "cpu") == (os.path.join(tiny_base_env, "eval_bundle"), None)
    assert resolve_core_bundle("auto", None, "cpu") == (os.path.join(tiny_base_env, "eval_bundle"), None)


def test_base_eval_core_on_missing_bundle_is_one_line(tiny_base_env, monkeypatch, online):
    from scripts import base_eval
    calls = []
    _serve(monkeypatch, urllib.error.URLError("no network"), calls)
    # decided before the model is loaded: there is no checkpoint here, and the error is about CORE
    with pytest.raises(UserError, match="no CORE eval bundle at .*download failed") as e:
        base_eval.main(["--device-type", "cpu", "--core", "on"])
    assert "\n" not in str(e.value) and EVAL_BUNDLE_URL in str(e.value)
    assert not os.path.exists(os.path.join(tiny_base_env, "eval_bundle")) and len(calls) == 1
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    with pytest.raises(UserError, match="NANOCHAT_OFFLINE is set") as e:
        base_eval.main(["--device-type", "cpu", "--core", "on"])
    assert "\n" not in str(e.value) and len(calls) == 1


def test_base_eval_cli_core(tiny_base_env, bundle, monkeypatch, capsys):
    from nanochat.tokenizer import get_tokenizer
    from scripts import base_eval
    from test_mid_train import make_base_checkpoint
    calls = []
    _serve(monkeypatch, AssertionError("the network was touched"), calls)
    model = make_base_checkpoint(tiny_base_env).eval()
    common = ["--device-type", "cpu", "--device-batch-size", "2", "--eval-tokens", "256", "--cloze-items", "0",
              "--max-new-tokens", "4"]
    results = base_eval.main(common + ["--core", "on", "--core-bundle", bundle])
    expected = evaluate_core(model, get_tokenizer(), bundle, progress=False)
    assert results["CORE metric"] == expected["core_metric"]
    out = capsys.readouterr().out
    assert "| toy_schema | schema | 1 | 3 |" in out and f"CORE metric: {expected['core_metric']:.4f}" in out
    report = os.path.join(tiny_base_env, "report", "base-model-evaluation.md")
    text = open(report).read()
    assert "- CORE metric: " in text and "| toy_lm | language_modeling | 2 | 4 |" in text
    assert "- Validation bpb: " in text and "Samples (greedy)" in text

    # auto on CPU: no bundle in the base dir, so a note and no CORE (and no download)
    results = base_eval.main(common)
    assert "CORE metric" not in results and "CORE: skipped" in capsys.readouterr().out
    assert "CORE: skipped" in open(report).read()
    # auto with the bundle in place runs it; the per-task cap shows in the table
    shutil.copytree(bundle, os.path.join(tiny_base_env, "eval_bundle"))
    results = base_eval.main(common + ["--core-max-per-task", "2"])
    capped = evaluate_core(model, get_tokenizer(), bundle, max_per_task=2, progress=False)
    assert results["CORE metric"] == capped["core_metric"]
    assert "| toy_mc | multiple_choice | 1 | 2 |" in capsys.readouterr().out
    assert "at most 2 examples per task" in open(report).read()
    assert "CORE metric" not in base_eval.main(common + ["--core", "off"])
    assert calls == []
