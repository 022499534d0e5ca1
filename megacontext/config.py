"""
MCConfig: every MegaContext knob, defined once. Scripts expose each field as a `--mc-<name>` flag
(underscores become dashes) through `add_mc_args` / `mc_config_from_args`, and checkpoints store
`asdict(cfg)` so that every stage rebuilds the same memory.
"""
from dataclasses import dataclass, asdict, fields


RETIRED = {"gist_shared"}  # fields older checkpoints still store; nothing reads them


@dataclass
class MCConfig:
    # --- tree ---
    block_size: int = 32          # K: entries summarised by one gist, at every level
    max_level: int = 4            # highest gist level (one gist per 32^4 ~ 1M tokens)
    storage_dtype: str = "float16"  # gist rows on disk: float16 or bfloat16
    # --- working context ---
    budget: int = 512             # W_max: a raw 32-token block costs 32, a gist costs 1
    tail_tokens: int = 128        # the newest tokens always stay raw (the "present")
    positions: str = "slot"       # "slot" (entry index) or "gaussian" (damped span centre)
    # --- allocator ---
    tau: float = 0.2              # |score| above tau asks for an expand (+) or a collapse (-)
    max_edits: int = 4            # edits per refocus pass
    cooldown: int = 2             # passes during which a fresh edit cannot be reversed
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
    # --- end-to-end training objective (megacontext/training/objective.py) ---
    train_hist_budget: int = 0    # B_h: cost of a history's WC in training; 0: max(budget // 2, tail + K)
    train_min_target: int = 64    # shortest target segment [s, T) after the block-aligned split s
    train_variants: str = "pyramid,random,lens,truncate"  # WC variants of the history, one forward each
    train_plain_lm: float = 0.25  # share of steps that train plain full-detail LM only (base quality)
    lens_weight: float = 1.0      # weight of LensNet's (listwise + binary) loss in the total
    lens_cands: int = 0           # counterfactual expansions per row (0: every gist of the context)
    lens_temp: float = 1.0        # nats: binary target = sigmoid(delta_nll / lens_temp)
    train_rows: int = 0           # rows per batch through the MC objective (0: all); the rest train plain LM
    gist_bow_weight: float = 0.0  # weight of the level-1 gists' bag-of-words loss (objective.bow_loss; 0: off)

    def __post_init__(self):
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

        if self.train_hist_budget and not (self.tail_tokens + self.block_size <= self.train_hist_budget
                                           <= self.budget):
            bad(f"train_hist_budget ({self.train_hist_budget}) must lie in [tail_tokens + block_size, budget] "
                f"= [{self.tail_tokens + self.block_size}, {self.budget}]")
        if self.train_min_target < 1:
            bad(f"train_min_target must be >= 1, got {self.train_min_target}")
        known = ("pyramid", "random", "lens", "truncate")
        names = [v for v in self.train_variants.split(",") if v]
        if not names or any(v not in known for v in names):
            bad(f"train_variants must be a comma list of {known}, got {self.train_variants!r}")
        if not 0 <= self.train_plain_lm <= 1:
            bad(f"train_plain_lm must be in [0, 1], got {self.train_plain_lm}")
        if self.train_rows < 0:
            bad(f"train_rows must be >= 0, got {self.train_rows}")
        if self.gist_bow_weight < 0:
            bad(f"gist_bow_weight must be >= 0, got {self.gist_bow_weight}")
        if self.lens_weight < 0 or self.lens_cands < 0 or self.lens_temp <= 0:
            bad("lens_weight and lens_cands must be >= 0 and lens_temp > 0")

    def hist_budget(self):
        """B_h, the training history budget, with the 0 default resolved."""
        return self.train_hist_budget or max(self.budget // 2, self.tail_tokens + self.block_size)

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


def add_mc_args(parser):
    """Add one --mc-<field> flag per MCConfig field (defaults from the dataclass)."""
    g = parser.add_argument_group("MegaContext (--mc-*)")
    for f in fields(MCConfig):
        flag = "--mc-" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            g.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default,
                           help=f"(default: {f.default})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            g.add_argument(flag, type=typ, default=f.default, help=f"(default: {f.default})")
    return parser


def mc_config_from_args(args):
    return MCConfig(**{f.name: getattr(args, "mc_" + f.name) for f in fields(MCConfig)})
