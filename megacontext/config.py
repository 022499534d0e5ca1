"""
MCConfig: every MegaContext knob, defined once, whose defaults are the recipe that works (dev/LOG.md). Scripts
expose each field as a `--mc-<name>` flag (underscores become dashes) through `add_mc_args`, and checkpoints
store `asdict(cfg)` so that every stage rebuilds the same memory.

One dial sizes it: the budget. A run that does not set `--mc-budget` reads the GPT's sequence length
(`mc_config_from_args(args, seq_len)`), so anything that fits the window is read exactly as the plain model
reads it; the raw tail and the training-history budget default to fixed shares of the budget (`tail_for`,
`hist_budget_for`): at runcpu's sequence length of 256 that is budget 256, tail 32 and histories of 96 slots;
at speedrun's 2048, budget 2048, tail 256 and 768.

A flag given on the command line always wins, also over the config a later stage inherits from its source
checkpoint (`megacontext/training/trainer.py: resolve_mc_config`); a flag left out never does.
"""
from dataclasses import dataclass, asdict, fields

# fields older checkpoints still store; nothing reads them (train_rows became train_row_share)
RETIRED = {"gist_shared", "train_rows"}
LEGACY_HIST_BUDGET = 0  # train_hist_budget 0 in an older checkpoint: max(budget // 2, tail + K)


def round_to_blocks(n, K):
    """n rounded to the nearest multiple of K, at least K."""
    return max(K, K * int(n / K + 0.5))


def tail_for(budget, K):
    """The raw tail a budget keeps by default: an eighth of it, in whole blocks."""
    return round_to_blocks(budget / 8, K)


def hist_budget_for(budget, tail, K):
    """The training-history budget B_h by default: three eighths of the budget, in whole blocks (at budget 256,
    B_h 96: pretraining's histories then leave most of a 256-token row to the target, and 112 cost the gists
    half their substitutability in one run; dev/LOG.md, 2026-11-22, 'the first CUDA runs')."""
    return max(tail + K, round_to_blocks(3 * budget / 8, K))


@dataclass
class MCConfig:
    # --- tree ---
    block_size: int = 32          # K: entries summarised by one gist, at every level
    max_level: int = 4            # highest gist level (one gist per 32^4 ~ 1M tokens)
    storage_dtype: str = "float16"  # gist rows on disk: float16 or bfloat16
    # --- working context ---
    budget: int = 512             # W_max: a raw 32-token block costs 32, a gist costs 1 (runs: the GPT's seq length)
    tail_tokens: int = None       # the newest tokens always raw (the "present"); None: tail_for(budget)
    positions: str = "slot"       # "slot" (entry index) or "gaussian" (damped span centre)
    # --- allocator ---
    tau: float = 0.2              # |score| above tau asks for an expand (+) or a collapse (-)
    max_edits: int = 4            # edits per refocus pass
    cooldown: int = 2             # passes during which a fresh edit cannot be reversed
    # --- focus (megacontext/focus.py) ---
    focus_start_room: int = 1     # expansions the start tiling leaves room for (dev/LOG.md, 2026-11-22, 'focus
    #                               that reads inside regions')
    focus_collapses: int = 3      # groups focus may fold to make room (the 64x straddle at budget 224 needed 3:
    #                               dev/LOG.md, 2026-11-22, 'the first CUDA runs')
    refocus_passes: int = 2       # chained allocator passes per incremental refocus (level 2 -> 1 -> raw)
    # --- GistNet ---
    gist_layers: int = 2
    gist_heads: int = 0           # 0: same as the GPT's head count
    gist_pool: str = "mean"       # "mean" or "attn" (learned-query attention pooling)
    # --- LensNet ---
    lens_dim: int = 128           # LensNet's own width
    lens_layers: int = 2
    lens_heads: int = 4
    # --- reranker (second stage of focus: reads the raw tokens of LensNet's shortlist with the question) ---
    # rerank_k: level-1 gists LensNet shortlists for the reranker, and per level-2 region when focus looks
    # inside regions (0: LensNet alone). 8, not 4: a multi-key history holds ~12 salient blocks that LensNet
    # cannot tell apart (dev/LOG.md, 2026-11-22, 'focus that reads inside regions')
    rerank_k: int = 8
    rerank_dim: int = 64          # its width (heads of 32)
    rerank_layers: int = 2
    # --- end-to-end training objective (megacontext/training/objective.py), pretraining ---
    train_hist_budget: int = None  # B_h: cost of a history's WC in training; None: hist_budget_for(budget)
    train_min_target: int = 64    # shortest target segment [s, T) after the block-aligned split s
    # WC variants of the history, one forward each (also "random", "truncate"; four ran out of an H100's memory
    # at depth 20 and did not train better on CPU: dev/LOG.md, 2026-11-22, 'the first CUDA runs')
    train_variants: str = "pyramid,lens"
    train_plain_lm: float = 0.25  # share of steps that train plain full-detail LM only (base quality)
    train_row_share: float = 1.0  # share of each micro-batch's rows through the MC objective; the rest plain LM
    # weight of a plain LM loss on the whole row, added to every MC-objective step. 3 buys base quality with
    # retrieval: at runcpu's size val bpb 1.879 against 1.973 (plain run 1.862), but passkey at 16x 79 % against 95,
    # at 64x in chat 45 % against 83 (dev/LOG.md, 2026-12-07, 'the whole row's plain loss on every MegaContext step')
    train_lm_weight: float = 0.0
    lens_weight: float = 1.0      # weight of LensNet's (listwise + binary) loss in the total
    lens_cands: int = 4           # counterfactual expansions per row (0: every gist of the context)
    lens_temp: float = 1.0        # nats: binary target = sigmoid(delta_nll / lens_temp)
    # the level-1 gists' bag-of-words loss (objective.bow_loss): level-1 substitutability 0.68 against 0.42
    # without (dev/LOG.md, 2026-11-22, 'midtraining unlearns prose')
    gist_bow_weight: float = 1.0
    # --- midtraining (scripts/mid_train.py, tasks/mc_mixture.py) ---
    mid_plain_lm: float = 0.5     # train_plain_lm of midtraining's chat and text rows
    mid_row_share: float = 0.25   # train_row_share of midtraining's chat and text rows
    mix_share: float = 0.8        # share of micro-batches that are long-context task rows
    mix_warmup: float = 0.4       # share of the run (first) given to the copy warm-up, at most
    mix_multiples: str = "1,4,16,64"  # task histories as multiples of the budget
    # long-context tasks (multi-key twice: the reranker learns from the rows only the question disambiguates;
    # chat_*: the same asked in a conversation, and a fact the user stated asked back: the memory as users reach it;
    # copy: the warm-up's induction rows, without which the rest of midtraining erases copying (dev/LOG.md,
    # 2026-12-08, 'midtraining erased the copying')
    mix_tasks: str = ("passkey,multikey,multikey,kv_recall,chat_passkey,chat_multikey,chat_memory,chat_memory,text,"
                      "copy")
    mix_batch_size: int = 0       # rows per long-context micro-batch (0: the run's --device-batch-size)
    warmup_exit: float = 0.5      # nats/token: the copy warm-up ends once its copy rows' loss is below this
    warmup_rows_mult: int = 2     # the warm-up's micro-batches have this many times mix_batch_size rows

    def __post_init__(self):
        if self.tail_tokens is None:
            self.tail_tokens = tail_for(self.budget, self.block_size)
        if self.train_hist_budget is None:
            self.train_hist_budget = hist_budget_for(self.budget, self.tail_tokens, self.block_size)
        elif self.train_hist_budget == LEGACY_HIST_BUDGET:
            self.train_hist_budget = max(self.budget // 2, self.tail_tokens + self.block_size)
        self.validate()

    def validate(self):
        def bad(msg):
            raise ValueError(f"invalid MegaContext config: {msg}")
        if self.block_size < 2:
            bad(f"block_size must be >= 2, got {self.block_size}")
        if self.max_level < 1:
            bad(f"max_level must be >= 1, got {self.max_level}")
        if self.storage_dtype not in ("float16", "bfloat16"):
            bad(f"storage_dtype must be float16 or bfloat16, got {self.storage_dtype!r}")
        if self.positions not in ("slot", "gaussian"):
            bad(f"positions must be 'slot' or 'gaussian', got {self.positions!r}")
        if self.gist_pool not in ("mean", "attn"):
            bad(f"gist_pool must be 'mean' or 'attn', got {self.gist_pool!r}")
        if self.tail_tokens < 0 or self.tail_tokens % self.block_size:
            bad(f"tail_tokens must be a non-negative multiple of block_size ({self.block_size}), got {self.tail_tokens}")
        # the raw tail (up to tail_tokens + a partial block) plus at least one gist must fit
        if self.budget < self.tail_tokens + self.block_size:
            bad(f"budget ({self.budget}) must be at least tail_tokens + block_size "
                f"({self.tail_tokens + self.block_size})")
        if not 0 <= self.tau < 1:
            bad(f"tau must be in [0, 1), got {self.tau}")
        if self.max_edits < 1 or self.cooldown < 0:
            bad("max_edits must be >= 1 and cooldown >= 0")
        if self.lens_dim % self.lens_heads:
            bad(f"lens_dim ({self.lens_dim}) must be divisible by lens_heads ({self.lens_heads})")
        if self.rerank_k < 0 or self.rerank_layers < 0 or self.rerank_dim < 32 or self.rerank_dim % 32:
            bad(f"rerank_k and rerank_layers must be >= 0 and rerank_dim a positive multiple of 32, got "
                f"{self.rerank_k}, {self.rerank_layers}, {self.rerank_dim}")

        # not bounded by the budget: a checkpoint trained at B_h may be read at any budget that holds its tail
        if self.train_hist_budget < self.tail_tokens + self.block_size:
            bad(f"train_hist_budget ({self.train_hist_budget}) must be at least tail_tokens + block_size "
                f"({self.tail_tokens + self.block_size})")
        if self.train_min_target < 1:
            bad(f"train_min_target must be >= 1, got {self.train_min_target}")
        if self.focus_start_room < 0 or self.focus_collapses < 0 or self.refocus_passes < 1:
            bad("focus_start_room and focus_collapses must be >= 0 and refocus_passes >= 1")
        known = ("pyramid", "random", "lens", "truncate")
        names = [v for v in self.train_variants.split(",") if v]
        if not names or any(v not in known for v in names):
            bad(f"train_variants must be a comma list of {known}, got {self.train_variants!r}")
        for name in ("train_plain_lm", "train_row_share", "mid_plain_lm", "mid_row_share", "mix_share", "mix_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mix_batch_size < 0 or self.warmup_rows_mult < 1:
            bad("mix_batch_size must be >= 0 and warmup_rows_mult >= 1")
        try:
            mults = [float(m) for m in self.mix_multiples.split(",") if m.strip()]
        except ValueError:
            mults = []
        if not mults or min(mults) <= 0:
            bad(f"mix_multiples must be a comma list of positive numbers, got {self.mix_multiples!r}")
        if self.gist_bow_weight < 0:
            bad(f"gist_bow_weight must be >= 0, got {self.gist_bow_weight}")
        if self.lens_weight < 0 or self.lens_cands < 0 or self.lens_temp <= 0:
            bad("lens_weight and lens_cands must be >= 0 and lens_temp > 0")

    def hist_budget(self):
        """B_h, the training history budget."""
        return self.train_hist_budget

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k not in RETIRED}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MegaContext config fields: {sorted(unknown)}")
        return cls(**d)


TYPES = {"int": int, "float": float, "str": str, int: int, float: float, str: str}
DERIVED = {"budget": "the GPT's sequence length", "tail_tokens": "an eighth of the budget",
           "train_hist_budget": "3/8 of the budget", "mix_batch_size": "--device-batch-size"}


def add_mc_args(parser):
    """Add one --mc-<field> flag per MCConfig field. Their argparse default is None ("not given"), so that a
    flag given explicitly can be told from one left out, even when it repeats the default."""
    g = parser.add_argument_group("MegaContext (--mc-*; defaults are the recipe that works)")
    for f in fields(MCConfig):
        shown = DERIVED.get(f.name, f.default)
        g.add_argument("--mc-" + f.name.replace("_", "-"), type=TYPES[f.type], default=None,
                       help=f"(default: {shown})")
    return parser


def given_mc_flags(args):
    """{field: value} of the --mc-* flags given on the command line."""
    return {f.name: getattr(args, "mc_" + f.name) for f in fields(MCConfig)
            if getattr(args, "mc_" + f.name, None) is not None}


def mc_config_from_args(args, seq_len=None):
    """The MCConfig of a run that starts MegaContext (pretraining): the flags given, the budget from the GPT's
    sequence length `seq_len` unless given, the rest the recipe's defaults and their derived sizes."""
    kw = given_mc_flags(args)
    if "budget" not in kw and seq_len is not None:
        kw["budget"] = int(seq_len)
    return MCConfig(**kw)
