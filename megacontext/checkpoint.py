"""
MegaContext nets in checkpoints: what the training stages save and what inference loads.

A checkpoint with MegaContext holds three extra state dicts, "gistnet", "lensnet" and "reranker", next to "gpt",
and meta["mc_config"] (MCConfig.to_dict()). Their optimizer state lives in the AdamW state of the
checkpoint's optimizer file (they are AdamW groups of the run's optimizer).

    nets = build_mc_modules(gpt, cfg)                  # {"gistnet": GistNet, "lensnet": LensNet, "reranker": ...}
    nets = load_mc_modules(gpt, model_data, meta, where)  # rebuilt from a checkpoint (or UserError)
    m = load_mc_checkpoint("sft", device=device)       # GPT + nets + tokenizer + MCConfig, ready to read with
"""
import os
from typing import NamedTuple

import torch

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet
from megacontext.lensnet import LensNet
from megacontext.reranker import Reranker
from nanochat.common import UserError

MC_NETS = ("gistnet", "lensnet", "reranker")


def build_mc_modules(gpt, cfg, device=None):
    """Fresh GistNet + LensNet + reranker sized from the GPT (they read the GPT's embedding space)."""
    device = device or gpt.get_device()
    n_embd, n_head = gpt.config.n_embd, gpt.config.n_head
    if n_embd % (cfg.gist_heads or n_head):
        raise UserError(f"--mc-gist-heads {cfg.gist_heads} does not divide the GPT width {n_embd}")
    nets = {"gistnet": GistNet(n_embd, cfg, n_head), "lensnet": LensNet(n_embd, cfg), "reranker": Reranker(n_embd, cfg)}
    return {k: v.to(device) for k, v in nets.items()}


def missing_mc(model_data, meta):
    return [k for k in MC_NETS if k not in model_data] + ([] if meta.get("mc_config") else ["mc_config"])


def load_mc_modules(gpt, model_data, meta, where, cfg=None, device=None):
    """
    GistNet + LensNet rebuilt from a checkpoint's state dicts (model_data: name -> state dict) and
    meta["mc_config"] (or `cfg`, e.g. with overrides applied). Missing pieces -> UserError naming them.
    """
    missing = missing_mc(model_data, meta)
    if missing:
        raise UserError(f"{where} has no MegaContext weights (missing {', '.join(missing)}): "
                        f"train the earlier stage with --mc, or run without --mc")
    cfg = cfg or MCConfig.from_dict(meta["mc_config"])
    nets = build_mc_modules(gpt, cfg, device)
    for name, net in nets.items():
        sd = {k.removeprefix("_orig_mod."): v.float() if v.is_floating_point() else v
              for k, v in model_data[name].items()}
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"{where}: the {name} weights do not fit its mc_config ({str(e).splitlines()[0]})") from None
    return nets


class MCModels(NamedTuple):
    """A checkpoint ready to read with: the GPT, its MegaContext nets, tokenizer, config, and where it came from."""
    gpt: object
    gistnet: object
    lensnet: object
    reranker: object
    tokenizer: object
    cfg: MCConfig
    source_info: dict


def load_mc_checkpoint(source="sft", model_tag=None, step=None, device=None):
    """A checkpoint that holds GPT, GistNet, LensNet and reranker weights and an MCConfig, in eval mode (fp32 off
    CUDA); UserError naming what is missing otherwise."""
    from nanochat.common import autodetect_device_type
    from nanochat.checkpoint_manager import checkpoint_dir_for, load_model
    device = torch.device(device or autodetect_device_type())
    gpt, tokenizer, meta = load_model(source, device, "eval", model_tag=model_tag, step=step)
    ckdir = checkpoint_dir_for(source, model_tag)
    step = meta.get("step", step) if step is None else step
    nets = load_mc_modules(gpt, meta["model_data"], meta, f"checkpoint {ckdir} (step {step})", device=device)
    gpt = gpt.float() if device.type != "cuda" else gpt
    info = {"source": source, "model_tag": os.path.basename(ckdir), "step": step}
    return MCModels(gpt, nets["gistnet"], nets["lensnet"], nets["reranker"], tokenizer,
                    MCConfig.from_dict(meta["mc_config"]), info)


__all__ = ["MC_NETS", "build_mc_modules", "missing_mc", "load_mc_modules", "MCModels", "load_mc_checkpoint"]
