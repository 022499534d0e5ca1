"""
GistNet: compresses 32 entries of level L-1 (the GPT's token embeddings for L=1, gists above)
into one gist in the GPT's embedding space.

    x (G, K, d) + level embedding -> n blocks, bidirectional attention inside the group
    (RoPE positions 0..K-1) -> pool (mean, or learned-query attention) -> residual head
    -> RMS-normalized and rescaled to the RMS of its children -> (G, d)

One module serves every level; the level embedding tells them apart. At init every residual
branch, the level embedding, the pooling query and the head are zero, so an untrained GistNet is
exactly a mean pool of its children at their scale: a sensible gist from step 0, which training then improves.

Why the rescale: nothing else bounds a gist's norm (the GPT normalizes its inputs), and without it gists
grew to ~100x the token embeddings' RMS in midtraining (RMS ~1000, entries up to ~8700: dev/LOG.md). That
broke two things: the GPT's smear mixes neighbouring inputs before its norm, so a gist drowned the raw
tokens after it (the first tokens of an opened block), and float16 tree rows lost the precision LensNet
reads (and would overflow at 65504 with longer training). At the children's scale a gist weighs like a token.

Also here: `build_gists` (all levels of one history, batched, differentiable, for training),
`GistLevels` (the tree reader protocol over that output), `gistnet_fingerprint` and `at_children_scale`.
"""
import hashlib
import json

import torch
import torch.nn as nn

from nanochat.gpt import Block, GPTConfig, init_transformer_weights, norm, rope_cos_sin


def at_children_scale(g, children):
    """g (G, d) RMS-normalized and rescaled to the RMS of its children (G, K, d): see the module docstring."""
    return norm(g) * children.float().pow(2).mean(dim=(1, 2)).sqrt()[:, None].to(g.dtype)


class GistNet(nn.Module):
    def __init__(self, n_embd, cfg, n_head):
        super().__init__()
        self.n_embd = n_embd
        self.block_size = cfg.block_size
        self.max_level = cfg.max_level
        self.pool = cfg.gist_pool
        self.n_head = cfg.gist_heads or n_head  # gist_heads = 0: the GPT's head count
        if n_embd % self.n_head:
            raise ValueError(f"GistNet: n_embd ({n_embd}) must be divisible by its head count ({self.n_head})")
        self.n_layer = cfg.gist_layers
        # Block only reads n_embd / n_head / n_kv_head from its config
        bcfg = GPTConfig(sequence_len=cfg.block_size, vocab_size=1, n_layer=self.n_layer,
                         n_head=self.n_head, n_kv_head=self.n_head, n_embd=n_embd)
        self.level_emb = nn.Embedding(cfg.max_level + 1, n_embd)
        self.blocks = nn.ModuleList([Block(bcfg, i) for i in range(self.n_layer)])
        self.pool_query = nn.Parameter(torch.zeros(n_embd)) if self.pool == "attn" else None
        self.head = nn.Linear(n_embd, n_embd, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        init_transformer_weights(self.blocks, self.n_embd)  # c_proj (residual outputs) start at zero
        nn.init.zeros_(self.level_emb.weight)
        nn.init.zeros_(self.head.weight)
        if self.pool_query is not None:
            nn.init.zeros_(self.pool_query)  # uniform attention weights = mean pool

    def arch(self):
        """What it takes to rebuild this module (stored in a tree's meta.json)."""
        return {"n_embd": self.n_embd, "n_head": self.n_head, "n_layer": self.n_layer, "pool": self.pool,
                "block_size": self.block_size, "max_level": self.max_level}

    def _cos_sin(self, device):
        pos = torch.arange(self.block_size, device=device)[None, :]  # positions inside the group
        return rope_cos_sin(pos, self.n_embd // self.n_head)

    def forward(self, x, level):
        """x: (G, K, n_embd) children at level-1; returns (G, n_embd) gists at `level`."""
        if x.dim() != 3 or x.size(1) != self.block_size or x.size(2) != self.n_embd:
            raise ValueError(f"GistNet expects input of shape (groups, {self.block_size}, {self.n_embd}), "
                             f"got {tuple(x.shape)}")
        if not isinstance(level, int) or not 1 <= level <= self.max_level:
            raise ValueError(f"GistNet level must be an int in 1..{self.max_level}, got {level!r}")
        w = self.level_emb.weight
        x_in = x
        x = x.to(w.dtype) + w[level]
        cos_sin = self._cos_sin(x.device)
        for block in self.blocks:
            x = block(x, cos_sin, causal=False)  # every child sees the whole group
        if self.pool_query is None:
            pooled = x.mean(dim=1)
        else:
            scores = (norm(x) @ self.pool_query) / self.n_embd ** 0.5  # (G, K)
            pooled = (scores.softmax(dim=1)[..., None] * x).sum(dim=1)
        return at_children_scale(pooled + self.head(norm(pooled)), x_in)


def build_gists(gistnet, token_embeds, cfg, max_level=None, max_batch=None):
    """
    All gist levels of one history, differentiable (training: the LM's and LensNet's losses reach
    GistNet through these). token_embeds: (N, d), or (B, N, d) for a batch of equal-length histories.
    Returns a list where index L holds the level-L gists, shape (N // K^L, d) (or (B, ., d)), for
    L = 1..max_level (empty tensors where the history is too short); index 0 is None.
    One GistNet call per level (all sequences and groups together) unless max_batch splits it.
    Only complete groups are gisted: a partial tail at any level is left out, never padded.
    """
    K = cfg.block_size
    max_level = cfg.max_level if max_level is None else max_level
    if max_level > gistnet.max_level:
        raise ValueError(f"max_level {max_level} exceeds the GistNet's max_level {gistnet.max_level}")
    single = token_embeds.dim() == 2
    x = token_embeds[None] if single else token_embeds
    if x.dim() != 3:
        raise ValueError(f"token_embeds must be (N, d) or (B, N, d), got {tuple(token_embeds.shape)}")
    B, _, d = x.shape
    levels = [None]
    for L in range(1, max_level + 1):
        G = x.size(1) // K
        if G == 0:
            out = x.new_zeros(B, 0, d)
        else:
            groups = x[:, :G * K].reshape(B * G, K, d)
            out = _batched(gistnet, groups, L, max_batch).view(B, G, d)
        levels.append(out[0] if single else out)
        x = out
    return levels


def _batched(gistnet, groups, level, max_batch=None):
    if max_batch is None or groups.size(0) <= max_batch:
        return gistnet(groups, level)
    return torch.cat([gistnet(groups[i:i + max_batch], level) for i in range(0, groups.size(0), max_batch)])


class GistLevels:
    """
    The tree reader protocol (see megacontext/tree.py) over `build_gists` output for one history:
    gists keep their autograd graph, so whatever reads them (working context, LensNet) trains GistNet.
    """

    def __init__(self, token_ids, levels):
        if token_ids.dim() != 1:
            raise ValueError(f"GistLevels takes one history: token_ids must be 1-D, got {tuple(token_ids.shape)}")
        self._ids = token_ids
        self._levels = levels
        self.num_tokens = token_ids.numel()
        self.max_level = len(levels) - 1
        dims = [lv.size(-1) for lv in levels[1:] if lv is not None]
        if not dims:
            raise ValueError("GistLevels needs at least one gist level")
        self.dim = dims[0]

    def with_tokens(self, token_ids):
        """The same gists over a longer token sequence (the history + raw tokens after it, e.g. a question
        that only ever sits in the raw tail)."""
        if not torch.equal(token_ids[:self.num_tokens], self._ids):
            raise ValueError("with_tokens must extend the reader's own tokens")
        return GistLevels(token_ids, self._levels)

    def count(self, level):
        if level < 0:
            raise ValueError(f"level must be >= 0, got {level}")
        if level == 0:
            return self.num_tokens
        return self._levels[level].size(0) if level <= self.max_level else 0

    def _check(self, level, start, end):
        n = self.count(level)
        if not 0 <= start <= end <= n:
            raise IndexError(f"range [{start}, {end}) out of bounds for level {level} with {n} entries")

    def tokens(self, start, end):
        self._check(0, start, end)
        return self._ids[start:end].long()

    def gists(self, level, start, end):
        if level < 1:
            raise ValueError(f"gists exist at levels >= 1, got {level}")
        self._check(level, start, end)
        if level > self.max_level:
            return torch.zeros(0, self.dim, device=self._ids.device)
        return self._levels[level][start:end].float()


def gistnet_fingerprint(gistnet):
    """A short hash of the GistNet's architecture and weights: trees built by other weights are stale."""
    h = hashlib.sha256(json.dumps(gistnet.arch(), sort_keys=True).encode())
    for name, t in sorted(gistnet.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
