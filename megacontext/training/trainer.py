"""
The --mc training path, shared by base_train, mid_train and chat_sft: the run's MCConfig (from flags, or a
source checkpoint's with allowed overrides), the nets loaded from a source stage, and the trainer that computes
each micro-batch's loss.

    cfg = resolve_mc_config(args, src_meta)            # the checkpoint's config (+ allowed overrides)
    trainer = MCTrainer(gpt, nets, cfg, seed)          # loss(x, y, step, micro, s=None) -> (loss, metrics)
"""
import dataclasses

import numpy as np

from megacontext.checkpoint import MC_NETS, load_mc_modules, missing_mc
from megacontext.config import MCConfig, mc_config_from_args
from megacontext.training.needle import needle_loss
from megacontext.training.objective import MCObjective
from nanochat.common import UserError

# MCConfig fields a later stage may change with a flag (training / focus knobs); every other field
# shapes the nets or the memory, so it must equal the source checkpoint's value
OVERRIDABLE = {"tau", "max_edits", "cooldown", "budget", "train_hist_budget", "train_min_target", "train_variants",
               "train_plain_lm", "train_rows", "lens_weight", "lens_cands", "lens_temp", "rerank_k", "gist_bow_weight"}


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
        """The retrieval recipe (megacontext/training/needle.py) on a long-context batch whose answer blocks are
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


__all__ = ["OVERRIDABLE", "resolve_mc_config", "mc_from_source", "MCTrainer", "mc_report", "param_checksum"]
