"""
MegaContext nets in checkpoints, shared by base_train, mid_train and chat_sft (and MCSession.load).

A checkpoint with MegaContext holds three extra state dicts, "gistnet", "lensnet" and "reranker", next to "gpt",
and meta["mc_config"] (MCConfig.to_dict()). Their optimizer state lives in the AdamW state of the
checkpoint's optimizer file (they are AdamW groups of the run's optimizer).

    cfg = resolve_mc_config(args, src_meta)            # the checkpoint's config (+ allowed overrides)
    nets = build_mc_modules(gpt, cfg)                  # {"gistnet": GistNet, "lensnet": LensNet, "reranker": ...}
    nets = load_mc_modules(gpt, model_data, meta, where)  # rebuilt from a checkpoint (or UserError)
    trainer = MCTrainer(gpt, nets, cfg, seed)          # loss(x, y, step, micro, s=None) -> (loss, metrics)
"""
import dataclasses

import numpy as np

from megacontext.config import MCConfig, mc_config_from_args
from megacontext.gistnet import GistNet
from megacontext.lensnet import LensNet
from megacontext.objective import MCObjective
from megacontext.retrieval import needle_loss
from megacontext.reranker import Reranker
from nanochat.common import UserError

MC_NETS = ("gistnet", "lensnet", "reranker")
# MCConfig fields a later stage may change with a flag (training / focus knobs); every other field
# shapes the nets or the memory, so it must equal the source checkpoint's value
OVERRIDABLE = {"tau", "max_edits", "cooldown", "budget", "train_hist_budget", "train_min_target", "train_variants",
               "train_plain_lm", "train_rows", "lens_weight", "lens_cands", "lens_temp", "rerank_k", "gist_bow_weight"}


def build_mc_modules(gpt, cfg, device=None):
    """Fresh GistNet + LensNet + reranker sized from the GPT (they read the GPT's embedding space)."""
    device = device or gpt.get_device()
    n_embd, n_head = gpt.config.n_embd, gpt.config.n_head
    if n_embd % (cfg.gist_heads or n_head):
        raise UserError(f"--mc-gist-heads {cfg.gist_heads} does not divide the GPT width {n_embd}")
    nets = {"gistnet": GistNet(n_embd, cfg, n_head), "lensnet": LensNet(n_embd, cfg), "reranker": Reranker(n_embd, cfg)}
    return {k: v.to(device) for k, v in nets.items()}


def has_mc(model_data, meta):
    return all(k in model_data for k in MC_NETS) and bool(meta.get("mc_config"))


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


def resolve_mc_config(args, src_meta=None):
    """
    The MCConfig of a run. Without a source mc_config (pretraining, or a source trained without
    --mc): from the --mc-* flags. With one: the source's config, where a --mc-* flag set to a value
    other than its default overrides the source only for the fields in OVERRIDABLE; a conflicting
    architecture field (block size, levels, GistNet/LensNet shape, positions) is a UserError.
    """
    src = (src_meta or {}).get("mc_config")
    if not src:
        try:
            return mc_config_from_args(args)
        except ValueError as e:
            raise UserError(str(e)) from None
    base = MCConfig.from_dict(src)
    default = MCConfig()
    changes, conflicts = {}, []
    for f in dataclasses.fields(MCConfig):
        # the flags are read one by one, not validated as a config of their own: `--mc-train-hist-budget 96` on
        # a checkpoint with 32 tail tokens is valid, though not next to the default tail of 128
        mine, theirs = getattr(args, "mc_" + f.name), getattr(base, f.name)
        if mine == getattr(default, f.name) or mine == theirs:
            continue  # flag left at its default (or agreeing): the checkpoint's value holds
        if f.name in OVERRIDABLE:
            changes[f.name] = mine
        else:
            conflicts.append(f"--mc-{f.name.replace('_', '-')}={mine} (checkpoint: {theirs})")
    if conflicts:
        raise UserError("MegaContext flags conflict with the source checkpoint's mc_config: " + ", ".join(conflicts)
                        + "; these fields shape the nets and cannot change between stages")
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        raise UserError(str(e)) from None


def mc_from_source(args, gpt, passthrough, meta, where, device, rank=0, lm=None):
    """
    --mc in a stage that starts from a checkpoint (midtraining, SFT): the MCConfig (the source's, with
    the overridable --mc-* flags), GistNet + LensNet loaded from `passthrough` (a one-line UserError
    naming `where` if the source has none), the other passthrough nets, and the MCTrainer.
    Returns (cfg, nets, passthrough_without_mc_nets, trainer).
    """
    if missing_mc(passthrough, meta):
        load_mc_modules(gpt, passthrough, meta, where)  # raises the one-line UserError
    cfg = resolve_mc_config(args, meta)
    nets = load_mc_modules(gpt, passthrough, meta, where, cfg=cfg, device=device)
    rest = {k: v for k, v in passthrough.items() if k not in MC_NETS}
    return cfg, nets, rest, MCTrainer(gpt, nets, cfg, seed=args.seed, rank=rank, lm=lm)


class MCTrainer:
    """
    The training loss of the --mc path: MCObjective over GPT + GistNet + LensNet, with a numpy rng
    seeded by (seed, rank, step, micro-step) so a resumed run draws the same splits and variants.
    Rows too short for a history block plus a target segment (short SFT conversations) fall back
    to the plain LM loss. `loss(..., s=...)` with an explicit split (long-context task rows) never
    takes the plain-LM branch, whose full-row forward would exceed the model's context. `lm` (default gpt)
    runs the plain-LM rows of the usual batch shape: the training scripts pass torch.compile(gpt) on CUDA.
    """

    def __init__(self, gpt, nets, cfg, seed=0, rank=0, lm=None):
        self.gpt, self.nets, self.cfg, self.seed, self.rank = gpt, nets, cfg, seed, rank
        self.objective = MCObjective(gpt, nets["gistnet"], nets["lensnet"], cfg, lm=lm)
        self.split_objective = MCObjective(gpt, nets["gistnet"], nets["lensnet"],
                                           dataclasses.replace(cfg, train_plain_lm=0.0))

    def rng(self, step, micro=0):
        return np.random.default_rng([self.seed, self.rank, step, micro])

    def needle(self, batch, step, micro=0):
        """The retrieval recipe (retrieval.needle_loss) on a long-context batch whose answer blocks are
        known (tasks/mc_mixture.MCBatch with blocks on every row)."""
        return needle_loss(self.split_objective, batch.x, batch.y, batch.s, batch.blocks, self.rng(step, micro),
                           reranker=self.nets.get("reranker"))

    def min_len(self):
        return self.cfg.block_size + self.cfg.train_min_target

    def loss(self, x, y, step, micro=0, s=None):
        if s is not None and s <= self.cfg.hist_budget():
            return self.gpt(x, y), {}  # the history fits raw: the packed forward IS the plain one
        if s is not None:
            return self.split_objective.loss(x, y, self.rng(step, micro), step, s=s)
        if x.size(1) < self.min_len():
            return self.gpt(x, y), {}
        r = self.cfg.train_rows
        if r and x.size(0) > r:
            # the MC objective on the first r rows, plain LM on the rest: its counterfactual and variant
            # forwards cost several times a plain forward, so a CPU run buys it for a few rows per step
            mc_loss, metrics = self.objective.loss(x[:r], y[:r], self.rng(step, micro), step)
            lm_loss = self.objective.lm(x[r:], y[r:])
            metrics["mc/rest_lm_loss"] = float(lm_loss.detach())
            return (r * mc_loss + (x.size(0) - r) * lm_loss) / x.size(0), metrics
        return self.objective.loss(x, y, self.rng(step, micro), step)


def mc_report(metrics, prefixes=("mc/loss", "mc/lens", "mc/delta_nll", "mc/budget", "mc/lod_count", "mc/swap",
                                  "mc/compression", "mc/plain_lm_loss")):
    """The MegaContext rows of a report section (and every mc/*_ms timing)."""
    out = {}
    for k, v in sorted(metrics.items()):
        if k.startswith(prefixes) or (k.startswith("mc/") and k.endswith("_ms")):
            out[k] = round(float(v), 4)
    return out


def param_checksum(modules):
    """float64 sum of every parameter of the given modules (a cheap cross-rank identity check)."""
    return sum(p.detach().double().sum().item() for m in modules for p in m.parameters())


__all__ = ["build_mc_modules", "load_mc_modules", "resolve_mc_config", "has_mc", "missing_mc", "MCTrainer",
           "mc_report", "param_checksum", "MC_NETS", "OVERRIDABLE"]
