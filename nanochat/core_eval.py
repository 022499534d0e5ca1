"""
The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794), computed the way nanochat computes
it, so that a base model's number can sit next to nanochat's leaderboard.

The eval bundle (EVAL_BUNDLE_URL, unzipped to $NANOCHAT_BASE_DIR/eval_bundle) holds
- core.yaml: `icl_tasks`, each with a label, an icl_task_type, a dataset_uri under eval_data/, num_fewshot
  (a one-element list) and an optional continuation_delimiter (default ' ')
- eval_meta_data.csv: each task's 'Random baseline', in percent
- eval_data/**.jsonl: one example per line

Every example becomes a few full prompts (few-shot demonstrations, then the example), tokenized with <|bos|>:
- multiple_choice {query, choices, gold}: one prompt per choice; the choices are the differing tails
  (after the rows' common token prefix), and the one with the lowest mean token loss is the model's pick
- schema {context_options, continuation, gold}: one prompt per context; the continuation is the common
  token suffix, scored under each context the same way
- language_modeling {context, continuation}: right when greedy decoding reproduces every continuation token

A task's accuracy is centered against its random baseline b (percent): (acc - 0.01 b) / (1 - 0.01 b), so
0 is chance and 1 is perfect; CORE is the mean of the centered accuracies over the tasks.
"""
import csv
import json
import os
import random
import shutil
import tempfile
import urllib.request
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import UserError, autocast_ctx

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_DIRNAME = "eval_bundle"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# the seeds below are nanochat's: the same subsample under a per-task cap, the same demonstrations
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


# ------------------------------------------------------------------------------------------ the bundle
def is_bundle(path):
    return (os.path.isfile(os.path.join(path, "core.yaml")) and os.path.isfile(os.path.join(path, "eval_meta_data.csv"))
            and os.path.isdir(os.path.join(path, "eval_data")))


def default_bundle_dir(base_dir):
    return os.path.join(base_dir, BUNDLE_DIRNAME)


def network_disabled():
    """The name of the set variable that forbids downloads (HF_HUB_OFFLINE / NANOCHAT_OFFLINE), or None."""
    for var in ("NANOCHAT_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _manual_placement_error(dest, reason):
    return UserError(f"no CORE eval bundle at {dest} ({reason}); download {EVAL_BUNDLE_URL} where there is a network, "
                     f"unzip it and put its eval_bundle/ folder (core.yaml, eval_meta_data.csv, eval_data/) at {dest}, "
                     "or pass --core-bundle DIR (or --core off to skip CORE)")


def ensure_eval_bundle(base_dir, url=EVAL_BUNDLE_URL, timeout=60):
    """
    The bundle directory under base_dir, downloaded and unzipped on first use. Atomic: the zip goes to a
    temporary name, is checked to be a zip, is unpacked into a temporary folder, and only a complete bundle
    is renamed into place; an interrupted or failed attempt leaves nothing behind. Offline (no network, or
    NANOCHAT_OFFLINE / HF_HUB_OFFLINE set) it raises a one-line UserError saying how to place it by hand.
    """
    dest = default_bundle_dir(base_dir)
    if is_bundle(dest):
        return dest
    if os.path.exists(dest):
        raise UserError(f"{dest} exists but is not a CORE eval bundle (no core.yaml, eval_meta_data.csv "
                        "and eval_data/): delete it and run again")
    var = network_disabled()
    if var:
        raise _manual_placement_error(dest, f"{var} is set, so it was not downloaded")
    os.makedirs(base_dir, exist_ok=True)
    fd, tmp_zip = tempfile.mkstemp(prefix=".eval_bundle-", suffix=".zip.part", dir=base_dir)
    tmp_dir = None
    try:
        print(f"downloading the CORE eval bundle from {url}")
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, f, 1 << 20)
        except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
            raise _manual_placement_error(dest, "download failed: " + " ".join(str(e).split())) from None
        if not zipfile.is_zipfile(tmp_zip):
            raise _manual_placement_error(dest, f"what {url} returned is not a zip file")
        tmp_dir = tempfile.mkdtemp(prefix=".eval_bundle-", dir=base_dir)
        with zipfile.ZipFile(tmp_zip) as z:
            z.extractall(tmp_dir)  # extractall drops absolute paths and '..' from member names
        root = os.path.join(tmp_dir, BUNDLE_DIRNAME)
        root = root if is_bundle(root) else tmp_dir
        if not is_bundle(root):
            raise _manual_placement_error(dest, f"the zip from {url} holds no core.yaml, eval_meta_data.csv "
                                                "and eval_data/")
        try:
            os.rename(root, dest)
        except OSError:
            if not is_bundle(dest):  # another process may have finished first; anything else is an error
                raise
        print(f"CORE eval bundle placed at {dest}")
        return dest
    finally:
        if os.path.exists(tmp_zip):
            os.remove(tmp_zip)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def load_bundle(bundle_dir):
    """The tasks of core.yaml in order: dicts {label, task_type, num_fewshot, continuation_delimiter, path,
    random_baseline}. UserError for a bundle that is missing or malformed."""
    import yaml
    if not is_bundle(bundle_dir):
        raise UserError(f"{bundle_dir} is not a CORE eval bundle: "
                        "it needs core.yaml, eval_meta_data.csv and eval_data/")
    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for t in config.get("icl_tasks") or []:
        label, task_type = t["label"], t["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise UserError(f"CORE task {label}: unsupported icl_task_type {task_type!r} "
                            f"(known: {', '.join(TASK_TYPES)})")
        if label not in baselines:
            raise UserError(f"CORE task {label} has no row in {os.path.join(bundle_dir, 'eval_meta_data.csv')}")
        shots = t.get("num_fewshot", 0)
        tasks.append({
            "label": label,
            "task_type": task_type,
            "num_fewshot": int(shots[0] if isinstance(shots, (list, tuple)) else shots),
            "continuation_delimiter": t.get("continuation_delimiter", " "),
            "path": os.path.join(bundle_dir, "eval_data", t["dataset_uri"]),
            "random_baseline": baselines[label],
        })
    if not tasks:
        raise UserError(f"{os.path.join(bundle_dir, 'core.yaml')} lists no icl_tasks")
    return tasks


def load_task_data(task, max_per_task=-1):
    """A task's examples, shuffled with a fixed seed (so that a cap takes the same subsample every time),
    then capped at max_per_task (-1: all)."""
    if not os.path.isfile(task["path"]):
        raise UserError(f"CORE task {task['label']}: no data file {task['path']}")
    with open(task["path"], encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def centered_accuracy(accuracy, random_baseline):
    """0 at chance, 1 when perfect; random_baseline is in percent, as in eval_meta_data.csv."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


# ------------------------------------------------------------------------------------------ prompts
def fewshot_indices(num_examples, idx, num_fewshot):
    """The demonstrations of example idx: a seeded draw from the other examples (fewer if there are not
    enough of them, e.g. under a small per-task cap)."""
    if num_fewshot <= 0:
        return []
    others = [i for i in range(num_examples) if i != idx]
    return random.Random(FEWSHOT_SEED + idx).sample(others, min(num_fewshot, len(others)))


def render_prompts(item, task_type, delimiter, fewshot=()):
    """
    The full prompt strings of one example. Each demonstration is '<input><delimiter><answer>' and a blank
    line; the example follows in the same shape with each candidate. language_modeling returns two prompts,
    without and with the continuation: its contexts are stripped (some carry trailing spaces), and so is the
    prompt without, so that its tokens are a clean prefix of the prompt with (a trailing space would merge
    into the continuation's first token).
    """
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{str(item['context']).strip()}{delimiter}"
        return [prompt.strip(), prompt + str(item["continuation"])]
    raise ValueError(f"unsupported task type {task_type!r}")


def _common_prefix_len(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def tokenize_prompts(tokenizer, prompts, task_type):
    """(rows, starts, ends): token rows (with <|bos|>) and, per row, the span [start, end) that is scored."""
    rows = tokenizer.encode(list(prompts), prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":  # same context, different choices: score what follows the shared prefix
        start = _common_prefix_len(rows)
        return rows, [start] * len(rows), [len(r) for r in rows]
    if task_type == "schema":  # different contexts, same continuation: score the shared suffix
        suffix = _common_prefix_len([r[::-1] for r in rows])
        return rows, [len(r) - suffix for r in rows], [len(r) for r in rows]
    without, with_ = rows
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise ValueError("the prompt without the continuation does not tokenize to a prefix of the prompt with it")
    return [with_], [len(without)], [len(with_)]


def crop_left(rows, starts, ends, max_len):
    """Rows longer than max_len keep their last max_len tokens (the scored span is at the end), spans shifted.
    A continuation longer than the window itself is scored from the window's second token on."""
    out = ([], [], [])
    for r, s, e in zip(rows, starts, ends):
        cut = max(0, len(r) - max_len)
        out[0].append(r[cut:])
        out[1].append(max(1, s - cut))
        out[2].append(e - cut)
    return out


# ------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_example(model, tokenizer, data, idx, task):
    """True if the model gets example data[idx] right."""
    item, task_type = data[idx], task["task_type"]
    fewshot = [data[i] for i in fewshot_indices(len(data), idx, task["num_fewshot"])]
    prompts = render_prompts(item, task_type, task["continuation_delimiter"], fewshot)
    rows, starts, ends = tokenize_prompts(tokenizer, prompts, task_type)
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    if max_len:
        rows, starts, ends = crop_left(rows, starts, ends, max_len)
    device = model.get_device()
    # right-pad with <|bos|>: the model is causal, so padding never changes the scored positions
    ids = torch.full((len(rows), max(len(r) for r in rows)), tokenizer.get_bos_token_id(), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    ids = ids.to(device)
    with autocast_ctx(device.type):
        logits = model(ids)
    # position t predicts token t+1, so the span [s, e) is scored from positions s-1 .. e-2; only those
    # positions are touched (a full (B, T, V) loss would be gigabytes at V = 65536 and T = 2048)
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1:e - 1].argmax(dim=-1), ids[0, s:e]))
    mean_losses = [F.cross_entropy(logits[i, s - 1:e - 1].float(), ids[i, s:e], reduction="none").mean().item()
                   for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]  # ties go to the first, as nanochat's do


def evaluate_task(model, tokenizer, data, task, progress=True):
    """Accuracy on one task. Under torch.distributed each rank scores every world_size-th example and an
    all-reduce sums the hits; a progress bar runs on rank 0."""
    from tqdm import tqdm
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    correct = torch.zeros(len(data), dtype=torch.float32, device=model.get_device())  # NCCL wants device tensors
    for idx in tqdm(range(rank, len(data), world_size), desc=task["label"], leave=False, dynamic_ncols=True,
                    disable=not progress or rank != 0):
        correct[idx] = float(score_example(model, tokenizer, data, idx, task))
    if world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.sum().item() / max(1, len(data))  # a count over a count: exact in float32 below 2**24


def evaluate_core(model, tokenizer, bundle_dir, max_per_task=-1, progress=True):
    """
    CORE of `model` on the bundle: {"tasks": [task dicts, with num_examples], "results": {label: accuracy},
    "centered_results": {label: centered accuracy}, "core_metric": mean of the centered accuracies}.
    """
    was_training = model.training
    model.eval()
    tasks = load_bundle(bundle_dir)
    results, centered = {}, {}
    try:
        for task in tasks:
            data = load_task_data(task, max_per_task)
            task["num_examples"] = len(data)
            results[task["label"]] = evaluate_task(model, tokenizer, data, task, progress=progress)
            centered[task["label"]] = centered_accuracy(results[task["label"]], task["random_baseline"])
    finally:
        model.train(was_training)
    return {"tasks": tasks, "results": results, "centered_results": centered,
            "core_metric": sum(centered.values()) / len(centered)}
