"""
Saving and loading checkpoints.

Layout: <base_dir>/{base,mid,chatsft}_checkpoints/<model_tag>/
    model_<step:06d>.pt        dict of named state dicts: {"gpt": ..., later "gistnet", "lensnet"}
    meta_<step:06d>.json       model_config, user config, step, loss/bpb, dataloader state, [mc_config]
    optim_<step:06d>_rank<r>.pt  optimizer state dicts (one list per rank)
Every file is written to a temporary name and renamed, so a crash never leaves a half-written file
under a real name, and the model file is written last, after every rank's optimizer file: a step whose
model file exists is complete.

Resuming (`--resume` of the training scripts): resume_step() says where a run starts, check_resumable()
refuses a checkpoint written by an incompatible run. A run that completes normally marks its last
checkpoint's meta "finished": true, so that `--resume=auto` can skip a stage that is done.
"""
import os
import re
import glob
import json
import logging

import torch
import torch.distributed as dist

from nanochat.common import UserError, get_base_dir
from nanochat.gpt import GPT, GPTConfig

logger = logging.getLogger("nanochat")

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints"}
SOURCE_COMMANDS = {"base": "python -m scripts.base_train", "mid": "python -m scripts.mid_train",
                   "sft": "python -m scripts.chat_sft"}


def atomic_write(path, write_fn):
    """write_fn(tmp) writes the file under a temporary name, then it is renamed to `path`: a crash never leaves
    a half-written file under the real name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _torch_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_meta(checkpoint_dir, step, meta_data):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta_data, f, indent=2)
    atomic_write(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), write)


def _clean_state_dict(sd):
    # torch.compile wraps the module: its keys carry an "_orig_mod." prefix we never want on disk
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, keep=None):
    """
    model_data: {"gpt": state_dict, ...} (rank 0 writes it and the meta);
    optimizer_data: anything torch.save can write (a list of optimizer state dicts), or None;
    every rank writes its own optimizer file. Under DDP every rank must call it (a barrier): the model file
    is written last, once every rank's optimizer file and the meta exist, so that find_last_step() only
    sees complete steps, even after a crash in the middle of a save. keep: how many of the newest steps
    to keep (older ones are deleted once this one is complete; None keeps all): at depth 20 a step is the
    model plus every rank's optimizer state, several GB.
    """
    if not isinstance(model_data, dict) or "gpt" not in model_data:
        raise ValueError('model_data must be a dict of named state dicts with at least "gpt"')
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_data is not None:
        _torch_save(optimizer_data, os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt"))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if rank == 0:
        save_meta(checkpoint_dir, step, meta_data)
        model_data = {name: _clean_state_dict(sd) for name, sd in model_data.items()}
        _torch_save(model_data, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")
        if keep is not None:
            prune_checkpoints(checkpoint_dir, keep)


def prune_checkpoints(checkpoint_dir, keep):
    """Delete every file of the steps older than the `keep` newest complete ones (a model file marks one)."""
    steps = sorted(int(m.group(1)) for f in os.listdir(checkpoint_dir) if (m := re.fullmatch(r"model_(\d+)\.pt", f)))
    for old in steps[:-keep] if keep > 0 else []:
        for f in glob.glob(os.path.join(checkpoint_dir, f"*_{old:06d}*")):
            os.remove(f)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Returns (model_data, optimizer_data or None, meta_data)."""
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    for path in (model_path, meta_path):
        if not os.path.exists(path):
            raise UserError(f"checkpoint file {path} does not exist")
    model_data = torch.load(model_path, map_location=device, weights_only=True)
    if not isinstance(model_data, dict) or "gpt" not in model_data:
        raise UserError(f"{model_path} is not a checkpoint of this harness (no 'gpt' state dict)")
    optimizer_data = None
    if load_optimizer:
        optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")
        if not os.path.exists(optim_path):
            raise UserError(f"optimizer state {optim_path} does not exist (was the run saved with "
                            f"a different number of ranks?)")
        optimizer_data = torch.load(optim_path, map_location=device, weights_only=True)
    with open(meta_path, encoding="utf-8") as f:
        meta_data = json.load(f)
    return model_data, optimizer_data, meta_data


def find_last_step(checkpoint_dir):
    """The largest step with a model file in checkpoint_dir; UserError if there is none."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "model_*.pt")):
        m = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path))
        if m:
            steps.append(int(m.group(1)))
    if not steps:
        raise UserError(f"no checkpoints found in {checkpoint_dir}")
    return max(steps)


def read_meta(checkpoint_dir, step):
    path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(path):
        raise UserError(f"checkpoint file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resume_step(checkpoint_dir, resume):
    """
    Where a training run with `--resume RESUME` starts: (step, finished). step None: from scratch (no
    --resume, or "auto" with no checkpoint yet); "auto" and "last": the last checkpoint ("last" insists that
    there is one); a number: that step. finished: "auto" found the last checkpoint marked finished (the run
    completed): the caller says so and exits without writing anything.
    """
    if resume is None:
        return None, False
    if resume in ("auto", "last"):
        try:
            step = find_last_step(checkpoint_dir)
        except UserError:
            if resume == "auto":
                return None, False
            raise
        return step, resume == "auto" and bool(read_meta(checkpoint_dir, step).get("finished"))
    try:
        return int(resume), False
    except ValueError:
        raise UserError(f"--resume takes auto, last or a step number, got {resume!r}") from None


def check_resumable(checkpoint_dir, step, meta, **mine):
    """UserError (one line) unless meta[key] == value for every key=value given (world_size, model_config, ...):
    a run resumes only what a run like it wrote."""
    for key, value in mine.items():
        if meta.get(key) != value:
            raise UserError(f"cannot resume {checkpoint_dir} step {step}: it was written with {key}={meta.get(key)}, "
                            f"this run has {key}={value} (move that directory away to start afresh)")


def restore_checkpoint(checkpoint_dir, step, device, modules, optimizers, rank=0, **expected):
    """
    Resume a run from a checkpoint: check_resumable(**expected) on its meta first (world_size, model_config,
    ...: one clear line instead of a shape error), then load every module of `modules` ({"gpt": model,
    "gistnet": ...}) and this rank's state of every optimizer. Returns (model_data, meta).
    """
    check_resumable(checkpoint_dir, step, read_meta(checkpoint_dir, step), **expected)
    model_data, optim_data, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    for name, module in modules.items():
        if name not in model_data:
            raise UserError(f"cannot resume {checkpoint_dir} step {step}: it has no {name!r} weights")
        module.load_state_dict(model_data[name])
    if len(optim_data) != len(optimizers):
        raise UserError(f"cannot resume {checkpoint_dir} step {step}: it has {len(optim_data)} optimizers, "
                        f"this run {len(optimizers)}")
    for opt, sd in zip(optimizers, optim_data):
        opt.load_state_dict(sd)
    return model_data, meta


def find_largest_model(checkpoints_dir):
    """The model tag to load by default: the largest d<N> tag, else the most recently written one."""
    if not os.path.isdir(checkpoints_dir):
        raise UserError(f"no checkpoints directory {checkpoints_dir}")
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise UserError(f"no model tags in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def build_model(checkpoint_dir, step, device, phase):
    """
    Rebuild the GPT of a checkpoint. phase: "train" or "eval" (sets the module mode).
    Returns (model, tokenizer, meta). meta["model_data"] holds the checkpoint's other named state
    dicts (e.g. "gistnet", "lensnet") so callers can build those nets without reading the file again.
    """
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    from nanochat.tokenizer import get_tokenizer
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    if device.type in ("cpu", "mps"):
        # checkpoints may hold bf16 tensors written on a GPU; compute in fp32 here
        model_data = {name: {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
                      for name, sd in model_data.items()}
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    # built on the meta device (no memory, no init); strict loading then fills every tensor
    model.load_state_dict(model_data["gpt"], strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the checkpoint in "
                        f"{checkpoint_dir} was trained with {config.vocab_size}: retrain or restore the tokenizer")
    meta["model_data"] = {k: v for k, v in model_data.items() if k != "gpt"}
    return model, tokenizer, meta


def checkpoint_dir_for(source, model_tag=None):
    """<base_dir>/<source dir>/<model_tag> (the largest tag when model_tag is None)."""
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}: choose one of {sorted(SOURCE_DIRS)}")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    hint = f"run `{SOURCE_COMMANDS[source]}` first"
    if not os.path.isdir(checkpoints_dir):
        raise UserError(f"no {source} checkpoints: {checkpoints_dir} does not exist ({hint})")
    if model_tag is None:
        try:
            model_tag = find_largest_model(checkpoints_dir)
        except UserError:
            raise UserError(f"no {source} checkpoints in {checkpoints_dir} ({hint})") from None
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"no checkpoints for model tag {model_tag!r}: {checkpoint_dir} does not exist ({hint})")
    return checkpoint_dir


def load_model(source, device, phase, model_tag=None, step=None):
    """Load the GPT of a stage: source in {"base", "mid", "sft"}. Returns (model, tokenizer, meta)."""
    checkpoint_dir = checkpoint_dir_for(source, model_tag)
    if step is None:
        try:
            step = find_last_step(checkpoint_dir)
        except UserError:
            raise UserError(f"no checkpoints in {checkpoint_dir} (run `{SOURCE_COMMANDS[source]}` first)") from None
    elif not os.path.exists(os.path.join(checkpoint_dir, f"model_{step:06d}.pt")):
        raise UserError(f"no checkpoint for step {step} in {checkpoint_dir}")
    if isinstance(device, str):
        device = torch.device(device)
    logger.info(f"loading {source} model from {checkpoint_dir} step {step}")
    return build_model(checkpoint_dir, step, device, phase)
