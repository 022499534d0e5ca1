"""
Evaluate a chat model (mid or sft) on tasks and print an accuracy table.

    python -m scripts.chat_eval -i sft                                  # every task
    python -m scripts.chat_eval -i mid -a "Arithmetic|Memory" -x 100    # some tasks, 100 problems each
    python -m scripts.chat_eval -i sft -a offline                       # the code-made tasks (no network)
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft          # problems split over ranks

Offline tasks (code-made, no download): Arithmetic, Spelling, Memory, Identity.
Hub tasks (need the internet or a cached copy; HF_HUB_OFFLINE=1 fails at once with one line):
ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval.

Generative tasks sample a reply with the Engine (greedy by default) and score it with the task's
evaluate(); a problem passes if any of --num-samples replies passes. Categorical tasks (ARC, MMLU)
read the logits of the answer letters after <|assistant_start|> and take the best letter.
ChatCORE is the mean accuracy over the tasks run, each centred on its chance level
(0 for generative tasks, 1/choices for multiple choice), so 0 = chance and 1 = perfect.
"""
import argparse
import sys
from functools import partial

import torch
import torch.distributed as dist

from nanochat.common import (UserError, run_main, compute_init, compute_cleanup, leave_together, print0,
                             autocast_ctx, autodetect_device_type, get_dist_info)
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from tasks.common import OFFLINE_TASKS, HUB_TASKS


def _task_factory(name):
    """name -> a zero-argument constructor of the eval split of that task."""
    from tasks.arithmetic import Arithmetic
    from tasks.identity import Identity
    from tasks.memory import Memory
    from tasks.spelling import Spelling
    offline = {"Arithmetic": partial(Arithmetic, "test", size=500), "Spelling": partial(Spelling, "test", size=500),
               "Memory": partial(Memory, "test", size=500), "Identity": partial(Identity, "test", size=200)}
    if name in offline:
        return offline[name]
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return partial(ARC, name, "test")
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return partial(MMLU, "all", "test")
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return partial(GSM8K, "main", "test")
    if name == "HumanEval":
        from tasks.humaneval import HumanEval
        return partial(HumanEval, "test")
    raise UserError(f"unknown task {name!r}; tasks: {', '.join(OFFLINE_TASKS + HUB_TASKS)} (or 'offline', 'hub', 'all')")


def load_task(name):
    return _task_factory(name)()


def parse_task_names(spec):
    """'A|B' -> [A, B]; the aliases offline / hub / all expand to their task lists."""
    names = []
    for part in spec.split("|"):
        part = part.strip()
        alias = {"offline": list(OFFLINE_TASKS), "hub": list(HUB_TASKS), "all": list(OFFLINE_TASKS + HUB_TASKS)}
        for name in alias.get(part, [part]):
            _task_factory(name)  # unknown names fail here, before any model is loaded
            if name not in names:
                names.append(name)
    if not names:
        raise UserError("no task given")
    return names


def _sum_across_ranks(*values, device="cpu"):
    # on the model's device: NCCL only reduces CUDA tensors (mps has no float64)
    t = torch.tensor(values, dtype=torch.float32 if torch.device(device).type == "mps" else torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _problem_indices(task, max_problems):
    """This rank's share of the first max_problems problems (all of them when max_problems is None)."""
    _, rank, _, world_size = get_dist_info()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    return range(rank, n, world_size)


@torch.no_grad()
def run_generative_eval(task, tokenizer, model, num_samples=1, max_new_tokens=256, temperature=0.0, top_k=50,
                        max_problems=None, quiet=False):
    """Sample replies and score them; returns the pass rate (any of num_samples passes)."""
    engine = Engine(model, tokenizer)
    device_type = model.get_device().type
    passed = total = 0
    for i in _problem_indices(task, max_problems):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        with autocast_ctx(device_type):
            results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                               temperature=temperature, top_k=top_k, seed=i)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        passed += int(any(task.evaluate(conversation, c) for c in completions))
        total += 1
        if not quiet and sys.stdout.isatty():
            print(f"\r\033[K{passed}/{total} ({100 * passed / total:.2f}%)", end="", flush=True)
    if not quiet and sys.stdout.isatty():
        print()
    passed, total = _sum_across_ranks(passed, total, device=model.get_device())
    return passed / max(total, 1)


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size=8, max_problems=None, quiet=False):
    """Multiple choice: the letter with the highest logit after <|assistant_start|>; returns accuracy."""
    device = model.get_device()
    pad_id = tokenizer.get_bos_token_id()
    letter_ids = {}

    def letter_id(letter):
        if letter not in letter_ids:
            ids = tokenizer.encode(letter)
            if len(ids) != 1:
                raise UserError(f"answer letter {letter!r} is not a single token for this tokenizer")
            letter_ids[letter] = ids[0]
        return letter_ids[letter]

    indices = list(_problem_indices(task, max_problems))
    passed = total = 0
    for b in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        with autocast_ctx(device.type):
            logits = model(ids)  # right padding: each row's last real position is unaffected (causal)
        for r, (conv, p) in enumerate(zip(conversations, prompts)):
            choices = [letter_id(letter) for letter in conv["letters"]]
            best = logits[r, len(p) - 1, choices].argmax().item()
            passed += int(task.evaluate(conv, conv["letters"][best]))
            total += 1
        if not quiet and sys.stdout.isatty():
            print(f"\r\033[K{passed}/{total} ({100 * passed / max(total, 1):.2f}%)", end="", flush=True)
    if not quiet and sys.stdout.isatty():
        print()
    passed, total = _sum_across_ranks(passed, total, device=model.get_device())
    return passed / max(total, 1)


def chance_level(task):
    """Accuracy of random guessing: 1/choices for multiple choice, 0 for open generation."""
    if task.eval_type == "categorical" and len(task) > 0:
        return 1.0 / len(task[0]["letters"])
    return 0.0


def run_chat_eval(task_name, model, tokenizer, num_samples=1, max_new_tokens=256, temperature=0.0, top_k=50,
                  batch_size=8, max_problems=None, quiet=False, task=None):
    """Accuracy of `model` on one task by name (the entry point chat_sft uses for its metrics)."""
    task = task if task is not None else load_task(task_name)
    if task.eval_type == "categorical":
        return run_categorical_eval(task, tokenizer, model, batch_size, max_problems, quiet)
    return run_generative_eval(task, tokenizer, model, num_samples, max_new_tokens, temperature, top_k,
                               max_problems, quiet)


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.chat_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", choices=["mid", "sft"], required=True, help="which chat model to evaluate")
    p.add_argument("-a", "--task-name", default="all",
                   help="task names separated by '|', or offline / hub / all (default: all)")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("-m", "--max-new-tokens", type=int, default=256)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="replies per problem (pass if any passes)")
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward (categorical tasks)")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="at most this many problems per task")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    names = parse_task_names(args.task_name)
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, _, world_size, device = compute_init(device_type)
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        # load every task first: a missing hub dataset fails before minutes of evaluation
        tasks = {name: load_task(name) for name in names}
        results, chance = {}, {}
        for name, task in tasks.items():
            print0(f"--- {name} ({task.eval_type}, {len(task) if args.max_problems is None else min(len(task), args.max_problems)} problems)")
            results[name] = run_chat_eval(name, model, tokenizer, args.num_samples, args.max_new_tokens,
                                          args.temperature, args.top_k, args.batch_size, args.max_problems,
                                          quiet=rank != 0, task=task)
            chance[name] = chance_level(task)
            print0(f"{name} accuracy: {100 * results[name]:.2f}%")
        chatcore = sum((results[n] - chance[n]) / (1.0 - chance[n]) for n in names) / len(names)
        width = max(len(n) for n in names + ["ChatCORE"])
        print0(f"\n{'task'.ljust(width)} | accuracy | chance")
        for n in names:
            print0(f"{n.ljust(width)} | {100 * results[n]:7.2f}% | {100 * chance[n]:5.1f}%")
        print0(f"{'ChatCORE'.ljust(width)} | {chatcore:8.4f} |")
        if rank == 0:
            from nanochat.report import get_report
            get_report().log(section=f"Chat evaluation {args.source}", data=[
                {"source": args.source, "model tag": args.model_tag or "(largest)", "checkpoint step": meta.get("step"),
                 "max problems": args.max_problems, "samples per problem": args.num_samples,
                 "temperature": args.temperature},
                {**results, "ChatCORE metric": chatcore},
            ])
        leave_together()
        return results
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(main)
