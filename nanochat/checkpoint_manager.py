"""
Saving and loading checkpoints.

Layout: <base_dir>/{base,mid,chatsft}_checkpoints/<model_tag>/
    model_<step:06d>.pt        dict of named state dicts: {"gpt": ..., later "gistnet", "lensnet"}
    meta_<step:06d>.json       model_config, user config, step, loss/bpb, dataloader state, [mc_config]
    optim_<step:06d>_rank<r>.pt  optimizer state dicts (one list per rank)
Every file is written to a temporary name and renamed, so a crash never leaves a half-written file
under a real name.
"""
import os
import re
import glob
import json
import logging

import torch

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


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """
    model_data: {"gpt": state_dict, ...} (rank 0 writes it and the meta);
    optimizer_data: anything torch.save can write (a list of optimizer state dicts), or None;
    every rank writes its own optimizer file. The model file is written last among rank 0's files
    so that find_last_step() only sees a step whose meta exists too.
    """
    if not isinstance(model_data, dict) or "gpt" not in model_data:
        raise ValueError('model_data must be a dict of named state dicts with at least "gpt"')
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_data is not None:
        _torch_save(optimizer_data, os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt"))
    if rank == 0:
        save_meta(checkpoint_dir, step, meta_data)
        model_data = {name: _clean_state_dict(sd) for name, sd in model_data.items()}
        _torch_save(model_data, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")


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
