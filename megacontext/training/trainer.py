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
from megacontext.config import MCConfig, given_mc_flags, mc_config_from_args
from megacontext.training.needle import needle_loss
from megacontext.training.objective import MCObjective
from nanochat.common import UserError

# MCConfig fields that shape the nets or the memory: a later stage must keep the source checkpoint's value.
# Every other field (training, focus and mixture knobs, the budget) may change with a flag.
ARCHITECTURE = {"block_size", "max_level", "storage_dtype", "positions", "gist_layers", "gist_heads", "gist_pool",
                "lens_dim", "lens_layers", "lens_heads", "rerank_dim", "rerank_layers"}


def resolve_mc_config(args, src_meta=None, seq_len=None):
    """
    The MCConfig of a run. Without a source mc_config (pretraining, or a source trained without --mc): the
    flags given, sized from the GPT's sequence length `seq_len` (config.mc_config_from_args). With one: the
    source's config, where every --mc-* flag given on the command line wins, even one equal to the default (a
    flag left out never does); a flag that contradicts an ARCHITECTURE field is a UserError.
    """
    src = (src_meta or {}).get("mc_config")
    try:
        if not src:
            return mc_config_from_args(args, seq_len)
        base = MCConfig.from_dict(src)
        changes, conflicts = {}, []
        for name, mine in given_mc_flags(args).items():
            theirs = getattr(base, name)
            if mine == theirs:
                continue
            if name in ARCHITECTURE:
                conflicts.append(f"--mc-{name.replace('_', '-')}={mine} (checkpoint: {theirs})")
            else:
                changes[name] = mine
        if conflicts:
            raise UserError("MegaContext flags conflict with the source checkpoint's mc_config: " + ", ".join(conflicts)
                            + "; these fields shape the nets and cannot change between stages")
        # the flags are applied one by one, not re-derived: `--mc-budget 512` keeps the checkpoint's tail and B_h
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        raise UserError(str(e)) from None


def mc_from_source(args, gpt, passthrough, meta, where, device, rank=0, lm=None, stage="mid"):
    """
    --mc in a stage that starts from a checkpoint (midtraining, SFT): the MCConfig (the source's, with
    the --mc-* flags given), GistNet + LensNet loaded from `passthrough` (a one-line UserError
    naming `where` if the source has none), the other passthrough nets, and the MCTrainer.
    Returns (cfg, nets, passthrough_without_mc_nets, trainer).
    """
    if missing_mc(passthrough, meta):
        load_mc_modules(gpt, passthrough, meta, where)  # raises the one-line UserError
    cfg = resolve_mc_config(args, meta)
    nets = load_mc_modules(gpt, passthrough, meta, where, cfg=cfg, device=device)
    rest = {k: v for k, v in passthrough.items() if k not in MC_NETS}
    return cfg, nets, rest, MCTrainer(gpt, nets, cfg, seed=args.seed, rank=rank, lm=lm, stage=stage)


class MCTrainer:
    """
    The training loss of the --mc path: MCObjective over GPT + GistNet + LensNet, with a numpy rng
    seeded by (seed, rank, step, micro-step) so a resumed run draws the same splits and variants.
    Rows too short for a history block plus a target segment (short SFT conversations) fall back
    to the plain LM loss. `loss(..., s=...)` with an explicit split (long-context task rows) never
    takes the plain-LM branch, whose full-row forward would exceed the model's context. `lm` (default gpt)
    runs the plain-LM rows of the usual batch shape: the training scripts pass torch.compile(gpt) on CUDA.
    """

    def __init__(self, gpt, nets, cfg, seed=0, rank=0, lm=None, stage="base"):
        if stage != "base":  # midtraining and SFT: their chat and text rows take the mid_* shares
            cfg = dataclasses.replace(cfg, train_plain_lm=cfg.mid_plain_lm, train_row_share=cfg.mid_row_share)
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
        B = x.size(0)
        r = B if self.cfg.train_row_share >= 1 else max(1, round(self.cfg.train_row_share * B))
        if r < B:
            # the MC objective on the first r rows, plain LM on the rest: its counterfactual and variant
            # forwards cost several times a plain forward, so a CPU run buys it for a few rows per step
            mc_loss, metrics = self.objective.loss(x[:r], y[:r], self.rng(step, micro), step)
            lm_loss = self.objective.lm(x[r:], y[r:])
            metrics["mc/rest_lm_loss"] = float(lm_loss.detach())
            return (r * mc_loss + (B - r) * lm_loss) / B, metrics
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


__all__ = ["ARCHITECTURE", "resolve_mc_config", "mc_from_source", "MCTrainer", "mc_report", "param_checksum"]
