"""
A KV cache for the GPT slots of a working context, with temporal invalidation (docs/architecture.md).

The cache remembers which slot each of its K/V rows belongs to, as an integer key per slot:
a raw token at absolute position t, or a gist node (L, i). Keys never change meaning (the tree is
append-only), and with both position schemes a slot's position is a function of the slots before it
(`slot`: its index; `gaussian`: its absolute span). So when the working context changes, every slot
before the first differing key keeps its K/V, and the rest is recomputed in one prefill:

    appended token (decode)        -> one new slot, a one-token forward
    refocus edit at entry j        -> the slots from entry j on are recomputed
    identical working context      -> nothing to do

`sync(wc, reader)` does exactly that (via `KVCache.truncate`) and leaves the logits of the last slot
in `last_logits`, so decoding is: sync, sample from last_logits, append the token, sync, ...
`full_logits` is the reference: a from-scratch forward of the same working context.

The decode step is the hot path: when the new WC only appends tokens to the synced one (its entries extend
the old ones with raw blocks), the new slots are the new tokens, read alone, at the next positions, and no
per-slot layout of the whole window is rebuilt (`_appended`).
"""
import numpy as np
import torch

from nanochat.common import autocast_ctx
from megacontext.positions import slot_layout, wc_positions
from megacontext.working_context import WorkingContext, materialize, forward_wc, wc_slot_embeddings


def slot_keys(wc, K, max_level, layout=None):
    """(T,) int64: raw token t -> t * M, gist (L, i) -> i * M + L, M = max_level + 1 (unique per slot).
    layout: slot_layout(wc) if the caller has it."""
    entry, starts, _, offset = layout or slot_layout(wc.levels, wc.indices, wc.num_tokens, K)
    lv = wc.levels[entry]
    M = max_level + 1
    return np.where(lv == 0, (starts[entry] + offset) * M, wc.indices[entry] * M + lv)


def first_difference(a, b):
    """Length of the common prefix of two int arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def suffix_slot_embeddings(wc, reader, wte, cfg, p, entry=None):
    """Slot embeddings of slots [p, T) only: reads just the entries that hold them (O(T - p) rows).
    entry: the slot -> entry map of slot_layout(wc) if the caller has it."""
    if entry is None:
        entry, _, _, _ = slot_layout(wc.levels, wc.indices, wc.num_tokens, cfg.block_size)
    e = int(entry[p])
    first_slot = int(np.searchsorted(entry, e))  # the first slot of entry e
    sub = WorkingContext(wc.levels[e:], wc.indices[e:], wc.num_tokens)  # spans are per-entry arithmetic
    return wc_slot_embeddings(sub, reader, wte, cfg)[p - first_slot:]


@torch.no_grad()
def full_logits(gpt, wc, reader, cfg, scheme=None):
    """Reference: logits (T, V) of a from-scratch forward of the whole working context."""
    mat = materialize(wc, reader, gpt.transformer.wte, cfg, scheme)
    with autocast_ctx(gpt.get_device().type):
        return forward_wc(gpt, mat)[0].float()


class WCKVCache:
    """The GPT's K/V for the slots of one working context (batch 1), kept across edits."""

    def __init__(self, gpt, cfg, scheme=None, capacity=None):
        self.gpt, self.cfg = gpt, cfg
        self.scheme = scheme or cfg.positions
        self.kv = gpt.new_kv_cache(1, seq_len=capacity or cfg.budget + 2 * cfg.block_size)
        self.keys = np.zeros(0, np.int64)
        self.last_logits = None      # (V,) fp32 logits after the last slot
        self.check_exact = False     # debug/tests: compare every sync with a full recompute
        self.recomputed = 0          # slots forwarded in total (prefills + decode steps)
        self.syncs = 0
        self.last_recomputed = 0     # slots forwarded by the last sync
        self._synced = None          # (levels, indices, num_tokens) of the WC the cache holds

    def __len__(self):
        return len(self.keys)

    def reset(self):
        self.kv.truncate(0)
        self.keys = np.zeros(0, np.int64)
        self.last_logits = None
        self._synced = None

    def _appended(self, wc):
        """Whether `wc` is the synced WC with tokens appended (the same entries, then raw blocks only), with
        every synced slot still in the cache: then its slots are the old ones and the new tokens, in order."""
        if self._synced is None or self.kv.pos != len(self.keys) or self.last_logits is None:
            return False
        lv, ix, n = self._synced
        W = len(lv)
        return (wc.num_tokens > n and len(wc) >= W and np.array_equal(wc.levels[:W], lv)
                and np.array_equal(wc.indices[:W], ix) and not wc.levels[W:].any())

    def _forward(self, embeds, pos, sigma, all_logits):
        device = self.gpt.get_device()
        with autocast_ctx(device.type):
            h = self.gpt(inputs_embeds=embeds[None], pos=pos[None].to(device),
                         pos_sigma=None if sigma is None else sigma[None].to(device),
                         kv_cache=self.kv, return_hidden=True)
            # the head only where logits are needed: (T, V) logits of a long prefill would be large
            return self.gpt.head(h[0] if all_logits else h[0, -1:]).float()

    @torch.no_grad()
    def sync(self, wc, reader, all_logits=False):
        """
        Bring the cache to `wc`: keep the K/V before the first changed slot, recompute the rest.
        Returns the number of slots recomputed, or with all_logits=True the (recomputed, V) logits.
        """
        K = self.cfg.block_size
        wte = self.gpt.transformer.wte
        if self._appended(wc):  # decode: the new slots are the new tokens, after every old slot
            a, n, p = self._synced[2], wc.num_tokens, len(self.keys)
            keys = np.concatenate([self.keys, np.arange(a, n, dtype=np.int64) * (self.cfg.max_level + 1)])
            embeds = wte(reader.tokens(a, n).to(wte.weight.device))
            if self.scheme == "slot":
                pos, sigma = torch.arange(p, len(keys), dtype=torch.float32), None
            else:  # a raw token sits at its own position, exact RoPE
                pos, sigma = torch.from_numpy(np.arange(a, n, dtype=np.float64)).float(), torch.zeros(n - a)
        else:
            layout = slot_layout(wc.levels, wc.indices, wc.num_tokens, K)  # once: keys, entries, positions
            keys = slot_keys(wc, K, self.cfg.max_level, layout)
            if len(keys) == 0:
                raise ValueError("cannot run the GPT on an empty working context (nothing ingested yet)")
            p = first_difference(keys, self.keys)
            if p == len(keys) and p == len(self.keys) and self.last_logits is not None and not all_logits:
                self.last_recomputed = 0
                return 0
            p = min(p, len(keys) - 1, self.kv.pos)  # at least the last slot, so its logits are fresh
            embeds = suffix_slot_embeddings(wc, reader, wte, self.cfg, p, layout[0])
            if self.scheme == "slot":
                pos, sigma = torch.arange(p, len(keys), dtype=torch.float32), None
            else:
                pos, sigma = wc_positions(wc, K, self.scheme)
                pos, sigma = pos[p:], sigma[p:]
        self.kv.truncate(p)
        logits = self._forward(embeds, pos, sigma, all_logits)
        self.keys = keys
        self._synced = (wc.levels.copy(), wc.indices.copy(), wc.num_tokens)
        self.last_logits = logits[-1]
        self.last_recomputed = len(keys) - p
        self.recomputed += len(keys) - p
        self.syncs += 1
        if self.check_exact:
            ref = full_logits(self.gpt, wc, reader, self.cfg, self.scheme)
            err = (ref[-1] - self.last_logits).abs().max().item()
            if err > 1e-4:
                raise AssertionError(f"incremental KV logits differ from a full recompute by {err:.2e}")
        return logits if all_logits else len(keys) - p

    @torch.no_grad()
    def score_continuation(self, wc, ids):
        """
        Logits (n, V) predicting ids[1:] and beyond, for token ids read raw right after `wc` (which
        must be the synced working context); the cache is restored afterwards, so nothing is appended.
        """
        T = len(self.keys)
        device = self.gpt.get_device()
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        n = ids.numel()
        if self.scheme == "slot":
            pos, sigma = torch.arange(T, T + n, dtype=torch.float32), None
        else:  # absolute token positions, exact RoPE for raw tokens
            N = wc.num_tokens
            pos, sigma = torch.arange(N, N + n, dtype=torch.float32), torch.zeros(n)
        try:
            return self._forward(self.gpt.transformer.wte(ids), pos, sigma, all_logits=True)
        finally:
            self.kv.truncate(T)
