"""
Reranker: the second stage of focus (megacontext/focus.py). LensNet reads one gist per block and
shortlists the `rerank_k` level-1 gists it scores highest; the reranker reads each shortlisted block's
raw tokens together with the question and picks the one to expand.

Why two stages: a gist scored against the pooled present cannot bind "which colour was asked" to "which
block holds that colour" (in an early CPU prototype LensNet alone found the asked key 23 % of the time, all
needles being equally salient), while a small cross-encoder over [question | raw block] learned it in about
two CPU-minutes (100 %). LensNet keeps the cheap part, salience over the whole memory; the reranker pays k short
forwards per refocus.

One candidate is the token sequence [question (Q tokens) | margin | block (K tokens) | margin],
Q = max(tail_tokens, K): the newest tokens of the present, which hold the question; the margins are the
K/2 tokens on either side of the block, so that a needle cut by a block boundary ("The red key | is
12345.") is still read whole, and the block whose core holds it can still be told apart. Tokens are read
through the GPT's token embedding, detached (the reranker's loss does not move the GPT's vocabulary),
projected to rerank_dim, plus a segment embedding (question / margin / block / padding beyond the
history) and an exact-match embedding (`match_flags`: does this token, or a bigram through it, occur in the
question), then `rerank_layers` non-causal nanochat Blocks with RoPE over the joint sequence; score = a
linear read of the mean encoding.

Why exact-match flags (as DrQA's reader and lexical rerankers use): the binding "the block says red key where
the question says red key" is a comparison of token identities across the two segments. Learned from the
embeddings alone it sat at chance over whole midtraining runs (dev/LOG.md, 2026-11-22, 'two-stage focus'):
the decoys share the asked colour, the other needles share "key is", and only the bigram through both tells
them apart; with the flags it learned the binding (2026-11-22, 'exact-match flags for the reranker').
"""
import math

import torch
import torch.nn as nn

from nanochat.gpt import Block, GPTConfig, init_transformer_weights, norm, rope_cos_sin
from megacontext.working_context import entry_spans

HEAD_DIM = 32
PAD = -1  # a position of a margin that lies outside the history


def question_len(cfg):
    """Q: how many of the newest tokens the reranker reads as the question."""
    return max(cfg.tail_tokens, cfg.block_size)


def margin(cfg):
    """Tokens read on each side of a candidate block."""
    return cfg.block_size // 2


def match_flags(ids, Q):
    """
    (C, T) long exact-match flags of [question (Q) | rest] rows: for each token after the question, 2 if a
    bigram through it (with the token before or after) occurs in the row's question, else 1 if the token
    itself occurs there, else 0. Question and PAD positions are 0.
    """
    q, r = ids[:, :Q], ids[:, Q:]
    ok = r != PAD
    uni = ((r[:, :, None] == q[:, None, :]) & (q != PAD)[:, None, :]).any(-1) & ok
    bi = ((r[:, 1:, None] == q[:, None, 1:]) & (r[:, :-1, None] == q[:, None, :-1])
          & (q[:, None, 1:] != PAD)).any(-1) & ok[:, 1:] & ok[:, :-1]  # bigram (r[j], r[j+1]) is in q
    two = torch.zeros_like(ok)
    two[:, 1:] |= bi   # the bigram's second token
    two[:, :-1] |= bi  # and its first
    flags = torch.where(two, 2, uni.long())
    return torch.cat([torch.zeros_like(q), flags], dim=1)


def segments(Q, K, m, device):
    """Segment ids of one [question | margin | block | margin] row: 0 question, 1 margin, 2 block."""
    return torch.tensor([0] * Q + [1] * m + [2] * K + [1] * m, device=device)


class Reranker(nn.Module):
    def __init__(self, n_embd, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.rerank_dim
        self.in_proj = nn.Linear(n_embd, d, bias=False)
        self.segment = nn.Embedding(4, d)  # question, margin, block, padding
        self.match = nn.Embedding(3, d)    # no match, token in the question, bigram in the question
        n_head = max(1, d // HEAD_DIM)
        bcfg = GPTConfig(n_embd=d, n_head=n_head, n_kv_head=n_head, n_layer=cfg.rerank_layers)
        self.blocks = nn.ModuleList([Block(bcfg, i) for i in range(cfg.rerank_layers)])
        self.out = nn.Linear(d, 1)
        self.head_dim = d // n_head
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        d = self.cfg.rerank_dim
        init_transformer_weights(self.blocks, d)
        nn.init.uniform_(self.in_proj.weight, -math.sqrt(3.0 / self.in_proj.in_features),
                         math.sqrt(3.0 / self.in_proj.in_features))
        nn.init.uniform_(self.segment.weight, -math.sqrt(3.0 / d), math.sqrt(3.0 / d))
        nn.init.uniform_(self.match.weight, -math.sqrt(3.0 / d), math.sqrt(3.0 / d))
        nn.init.uniform_(self.out.weight, -math.sqrt(3.0 / d), math.sqrt(3.0 / d))  # not 0: that would stop
        nn.init.zeros_(self.out.bias)                                                # every gradient below it

    def forward(self, ids, wte):
        """ids (C, Q + K + 2m) long: [question | margin | block | margin] per candidate (PAD outside the
        history) -> (C,) logits (higher: expand this one)."""
        C, T = ids.shape
        K, m = self.cfg.block_size, margin(self.cfg)
        pad = ids == PAD
        x = wte(ids.clamp_min(0)).detach().to(self.in_proj.weight.dtype)
        Q = T - K - 2 * m
        seg = torch.where(pad, 3, segments(Q, K, m, ids.device)[None])
        h = norm(self.in_proj(norm(x))) + self.segment(seg) + self.match(match_flags(ids, Q))
        cos_sin = rope_cos_sin(torch.arange(T, device=ids.device)[None].expand(C, T), self.head_dim)
        for block in self.blocks:
            h = block(h, cos_sin, causal=False)
        return self.out(norm(h).mean(1)).squeeze(-1)


def candidate_ids(reader, wc, entries, question, cfg):
    """(C, Q + K + 2m) [question | margin | raw block | margin] rows for the level-1 gists `entries` of wc
    (margin positions outside the reader's tokens are PAD); question: (Q,) ids."""
    K, m, n = cfg.block_size, margin(cfg), reader.num_tokens
    starts, _ = entry_spans(wc, K)
    rows = []
    for j in entries:
        a, b = int(starts[j]) - m, int(starts[j]) + K + m
        win = reader.tokens(max(a, 0), min(b, n))
        q = question.to(win.device)
        rows.append(torch.cat([q, win.new_full((max(0, -a),), PAD), win, win.new_full((max(0, b - n),), PAD)]))
    return torch.stack(rows)
