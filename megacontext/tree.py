"""
The MegaContext tree: an append-only memory of everything the model read.

Level 0 holds token ids; level L holds one gist per 32 (K) level-(L-1) entries, so node (L, i)
covers tokens [i*K^L, (i+1)*K^L). Node identity is arithmetic, no per-node objects. Tokens arrive
in chunks of any size; a group is gisted only once all K children exist (never padding), so the
partial tail of every level stays ungisted. Each `append` makes one GistNet call per level for all
groups it completed (split only past `max_batch` groups), under no_grad.

Gists are stored in the storage dtype (fp16/bf16) and the next level is computed from those
*stored* rows, so the tree's content does not depend on how the stream was chunked, and RAM and
disk backends hold bit-identical data.

Reader protocol (used by the working context; also implemented by gistnet.GistLevels):
    num_tokens, dim, count(level), tokens(start, end) -> LongTensor, gists(level, start, end) -> fp32

Disk trees (`MCTree.create(dir, ...)`, `MCTree.open(dir, ...)`) record in meta.json the model
identity and the GistNet fingerprint; opened with different ones the tree is `stale` (tokens stay
readable, gists refuse) until `regist()` or `python -m megacontext.tree regist DIR --checkpoint F`.
An append commits the levels top-down, L0 last: the L0 count is the commit point, and on open
higher levels are clamped to what L0 supports, so an interrupted append leaves the previous state.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn as nn

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet, gistnet_fingerprint
from megacontext.storage import (DiskLevel, RamLevel, TreeError, level_path, read_meta, storage_torch_dtype,
                                 write_meta)
from nanochat.common import UserError, run_main


class StaleTreeError(TreeError):
    """The tree's gists were built by another GistNet / model: they must be recomputed."""


def _resolve_embed(embed, vocab_size, fallback_vocab=None):
    """
    embed: an nn.Embedding, a GPT (uses its wte), or a callable ids -> (n, d). The vocabulary size is
    `vocab_size` if given, else the embedding's, else (callables) `fallback_vocab` (e.g. from meta.json).
    """
    wte = getattr(getattr(embed, "transformer", None), "wte", None)
    if isinstance(wte, nn.Embedding):
        embed = wte
    if isinstance(embed, nn.Embedding):
        return embed, vocab_size or embed.num_embeddings
    if not callable(embed):
        raise TypeError(f"embed must be an nn.Embedding, a GPT or a callable, got {type(embed).__name__}")
    vocab_size = vocab_size or fallback_vocab
    if vocab_size is None:
        raise ValueError("vocab_size is required when embed is a plain callable")
    return embed, vocab_size


def validate_ids(ids, vocab_size):
    """Token ids as a 1-D int64 CPU tensor; clear errors for non-integers and out-of-vocab ids."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TreeError(f"token ids must be integers, got a tensor of {ids.dtype}")
        t = ids.detach().cpu().to(torch.int64)
    else:
        a = np.asarray(ids)
        if a.size == 0:
            return torch.zeros(0, dtype=torch.int64)
        if a.dtype.kind not in "iu":
            raise TreeError(f"token ids must be integers, got {a.dtype} values (e.g. {a.reshape(-1)[0]!r})")
        t = torch.from_numpy(a.astype(np.int64))
    if t.dim() != 1:
        raise TreeError(f"token ids must be 1-D, got shape {tuple(t.shape)}")
    if t.numel():
        bad = (t < 0) | (t >= vocab_size)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise TreeError(f"token id {int(t[i])} at position {i} is outside the vocabulary [0, {vocab_size})")
    return t


class MCTree:
    """Build with MCTree.ram(...), MCTree.create(dir, ...), MCTree.open(dir, ...) or open_or_create."""

    def __init__(self, cfg, gistnet, embed, stores, vocab_size=None, path=None, model_id="",
                 max_batch=8192, stale_reason=None, fallback_vocab=None):
        self.cfg = cfg
        self.K = cfg.block_size
        self.max_level = cfg.max_level
        self.gistnet = gistnet
        self.embed, self.vocab_size = _resolve_embed(embed, vocab_size, fallback_vocab)
        self.dim = gistnet.n_embd
        self.path = path
        self.model_id = model_id
        self.max_batch = max_batch
        self.stale_reason = stale_reason
        self._stores = stores
        self._gist_dtype = storage_torch_dtype(cfg.storage_dtype)
        if gistnet.block_size != self.K or gistnet.max_level < self.max_level:
            raise TreeError(f"GistNet (K={gistnet.block_size}, max_level={gistnet.max_level}) does not fit a tree "
                            f"with K={self.K}, max_level={self.max_level}")

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def ram(cls, cfg, gistnet, embed, vocab_size=None, max_batch=8192):
        device = next(gistnet.parameters()).device
        stores = [RamLevel(0, 1, "uint32", device)]
        stores += [RamLevel(L, gistnet.n_embd, cfg.storage_dtype, device) for L in range(1, cfg.max_level + 1)]
        return cls(cfg, gistnet, embed, stores, vocab_size, max_batch=max_batch)

    @classmethod
    def create(cls, path, cfg, gistnet, embed, model_id="", vocab_size=None, fsync=False, max_batch=8192):
        if os.path.exists(os.path.join(path, "meta.json")) or os.path.exists(level_path(path, 0)):
            raise TreeError(f"{path}: a tree already exists there; use MCTree.open")
        os.makedirs(path, exist_ok=True)
        d = gistnet.n_embd
        stores = [DiskLevel.create(level_path(path, 0), 0, cfg.block_size, 1, "uint32", fsync)]
        stores += [DiskLevel.create(level_path(path, L), L, cfg.block_size, d, cfg.storage_dtype, fsync)
                   for L in range(1, cfg.max_level + 1)]
        tree = cls(cfg, gistnet, embed, stores, vocab_size, path=path, model_id=model_id, max_batch=max_batch)
        tree._write_meta()  # written last: a directory without meta.json is not a tree
        return tree

    @classmethod
    def open(cls, path, gistnet, embed, model_id=None, vocab_size=None, fsync=False, max_batch=8192, cfg=None):
        """
        Open a disk tree. Its MCConfig comes from meta.json (a `cfg` given must agree on the tree fields).
        model_id=None skips the model identity check. A different GistNet or model makes it `stale`.
        """
        meta = read_meta(path)
        try:
            tcfg = MCConfig.from_dict(meta["mc_config"])
        except (TypeError, ValueError) as e:
            raise TreeError(f"{path}/meta.json: bad mc_config ({e})") from None
        if cfg is not None:
            for f in ("block_size", "max_level", "storage_dtype"):
                if getattr(cfg, f) != getattr(tcfg, f):
                    raise TreeError(f"{path}: tree was built with {f}={getattr(tcfg, f)!r}, "
                                    f"but the config asks for {getattr(cfg, f)!r}")
        if meta["dim"] != gistnet.n_embd:
            raise TreeError(f"{path}: tree holds {meta['dim']}-dim gists, the GistNet makes {gistnet.n_embd}-dim ones")
        stores = []
        try:
            for L in range(tcfg.max_level + 1):
                s = DiskLevel.open(level_path(path, L), L, fsync)
                stores.append(s)
                want = (tcfg.block_size, 1 if L == 0 else meta["dim"], "uint32" if L == 0 else tcfg.storage_dtype)
                if (s.K, s.dim, s.dtype) != want:
                    raise TreeError(f"{s.path}: header (K={s.K}, dim={s.dim}, {s.dtype}) disagrees with meta.json "
                                    f"(K={want[0]}, dim={want[1]}, {want[2]})")
        except BaseException:
            for s in stores:
                s.close()
            raise
        stale = []
        fp = gistnet_fingerprint(gistnet)
        if meta["gistnet"] != fp:
            stale.append(f"its gists were built by GistNet {meta['gistnet']}, the current GistNet is {fp}")
        if model_id is not None and meta["model_id"] != model_id:
            stale.append(f"it was built for model {meta['model_id']!r}, the current model is {model_id!r}")
        tree = cls(tcfg, gistnet, embed, stores, vocab_size, path=path,
                   model_id=meta["model_id"] if model_id is None else model_id, max_batch=max_batch,
                   stale_reason="; ".join(stale) or None, fallback_vocab=meta.get("vocab_size"))
        tree._repair()
        return tree

    @classmethod
    def open_or_create(cls, path, cfg, gistnet, embed, model_id="", **kw):
        if os.path.exists(os.path.join(path, "meta.json")):
            return cls.open(path, gistnet, embed, model_id=model_id, cfg=cfg, **kw)
        return cls.create(path, cfg, gistnet, embed, model_id=model_id, **kw)

    def _write_meta(self, gistnet_fp=None):
        if self.path is None:
            return
        write_meta(self.path, {"model_id": self.model_id, "gistnet": gistnet_fp or gistnet_fingerprint(self.gistnet),
                               "gistnet_arch": self.gistnet.arch(), "dim": self.dim, "vocab_size": self.vocab_size,
                               "counts": self.level_counts(), "mc_config": self.cfg.to_dict()})

    def _repair(self):
        """After a crash: clamp each level to what the level below supports, then (if fresh) gist what is missing."""
        for L in range(1, self.max_level + 1):
            self._stores[L].truncate(self._stores[L - 1].count // self.K)
        if not self.stale:
            self._catch_up()

    # --- reader protocol ------------------------------------------------------------------------

    @property
    def stale(self):
        return self.stale_reason is not None

    @property
    def num_tokens(self):
        return self._stores[0].count

    def __len__(self):
        return self.num_tokens

    @property
    def device(self):
        return next(self.gistnet.parameters()).device

    def count(self, level):
        if level < 0:
            raise ValueError(f"level must be >= 0, got {level}")
        return self._stores[level].count if level <= self.max_level else 0

    def level_counts(self):
        return [s.count for s in self._stores]

    def _check(self, level, start, end):
        n = self.count(level)
        if not 0 <= start <= end <= n:
            raise IndexError(f"range [{start}, {end}) out of bounds for level {level} with {n} entries")

    def _require_fresh(self, what):
        if self.stale:
            raise StaleTreeError(f"cannot {what}: the tree at {self.path} is stale ({self.stale_reason}); "
                                 f"recompute its gists with tree.regist() or "
                                 f"`python -m megacontext.tree regist {self.path} --checkpoint FILE`")

    def tokens(self, start, end):
        self._check(0, start, end)
        return self._stores[0].read(start, end).long().to(self.device)

    def gists(self, level, start, end):
        if level < 1:
            raise ValueError(f"gists exist at levels >= 1, got {level}")
        self._require_fresh("read gists")
        self._check(level, start, end)
        if level > self.max_level:
            return torch.zeros(0, self.dim, device=self.device)
        return self._stores[level].read(start, end).to(self.device, torch.float32)

    # --- ingest ---------------------------------------------------------------------------------

    def _children(self, L, lo, hi, staged):
        """GistNet input for level L: level-(L-1) rows [lo, hi) (committed rows, then staged ones), embedded."""
        store = self._stores[L - 1]
        parts = []
        if lo < store.count:
            parts.append(store.read(lo, min(hi, store.count)).to(self.device))
        if hi > store.count:
            parts.append(staged[L - 1][max(lo, store.count) - store.count:hi - store.count].to(self.device))
        x = torch.cat(parts)
        if L == 1:
            x = self.embed(x.long())
        return x.to(next(self.gistnet.parameters()).dtype).view(-1, self.K, self.dim)

    @torch.no_grad()
    def _make_gists(self, L, g0, g1, staged):
        """Gists of level-L nodes [g0, g1) in the storage dtype; one GistNet call per max_batch groups."""
        out = []
        for a in range(g0, g1, self.max_batch):
            b = min(g1, a + self.max_batch)
            out.append(self.gistnet(self._children(L, a * self.K, b * self.K, staged), L).to(self._gist_dtype))
        return torch.cat(out)

    def append(self, ids):
        """Append token ids (list, numpy array or integer tensor); gist every group they complete. Returns len(ids)."""
        ids = validate_ids(ids, self.vocab_size)
        if ids.numel() == 0:
            return 0
        self._require_fresh("append")
        staged = {0: ids.to(torch.int32)}
        for L in range(1, self.max_level + 1):
            below = self._stores[L - 1].count + staged[L - 1].size(0)
            g0, g1 = self._stores[L].count, below // self.K
            if g1 == g0:
                break  # nothing completed here, so nothing above either
            staged[L] = self._make_gists(L, g0, g1, staged)
        try:
            for L, rows in staged.items():
                self._stores[L].write(rows)
            # top-down: the L0 count is the commit point (open clamps higher levels to it)
            for L in sorted(staged, reverse=True):
                self._stores[L].commit()
        except BaseException:
            for s in self._stores:
                s.discard()
            raise
        return ids.numel()

    def _catch_up(self):
        """Gist every complete group that has no gist yet (after a crash or a reset), level by level."""
        for L in range(1, self.max_level + 1):
            self._catch_up_level(L)

    def regist(self, gistnet=None, embed=None, model_id=None, progress=False):
        """Recompute every gist from the L0 tokens (with a new GistNet / embedding / model id if given)."""
        if gistnet is not None:
            if gistnet.n_embd != self.dim:
                raise TreeError(f"new GistNet makes {gistnet.n_embd}-dim gists, the tree holds {self.dim}-dim ones")
            self.gistnet = gistnet
        if embed is not None:
            self.embed, _ = _resolve_embed(embed, self.vocab_size)
        if model_id is not None:
            self.model_id = model_id
        # mark the tree as in-progress first: a crash midway leaves it stale for every GistNet
        self._write_meta(gistnet_fp="regist-in-progress")
        for L in range(self.max_level, 0, -1):
            self._stores[L].truncate(0)
        self.stale_reason = None
        levels = range(1, self.max_level + 1)
        if progress:
            from tqdm import tqdm
            levels = tqdm(levels, desc="regist levels")
        for L in levels:
            self._catch_up_level(L)
        self._write_meta()

    def _catch_up_level(self, L):
        """Chunks of max_batch groups, each committed: a big tree is re-gisted in bounded memory."""
        g1 = self._stores[L - 1].count // self.K
        while self._stores[L].count < g1:
            g0 = self._stores[L].count
            self._stores[L].write(self._make_gists(L, g0, min(g1, g0 + self.max_batch), {}))
            self._stores[L].commit()

    # --- lifecycle ------------------------------------------------------------------------------

    def flush(self):
        """fsync every level file and refresh meta.json's informational counts."""
        for s in self._stores:
            s.sync()
        if not self.stale:
            self._write_meta()

    def close(self):
        if self.path is not None and self._stores and not self.stale:
            self._write_meta()
        for s in self._stores:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def disk_bytes(self):
        """Committed bytes on disk (headers + rows), 0 for a RAM tree."""
        if self.path is None:
            return 0
        return sum(os.path.getsize(level_path(self.path, L)) for L in range(self.max_level + 1))

    def __repr__(self):
        where = self.path or "RAM"
        return f"MCTree({where}, tokens={self.num_tokens}, counts={self.level_counts()}{', STALE' if self.stale else ''})"


# ------------------------------------------------------------------------------------------------
# CLI: inspect a tree, or recompute its gists with the GistNet and embedding of a checkpoint

def load_gist_checkpoint(path, meta):
    """
    (gistnet, wte, model_id) from a torch file holding a dict with:
      "gistnet": GistNet state_dict, and the GPT token embedding as "wte" (a (V, d) tensor) or inside
      "model"/"gpt" (a GPT state_dict with "transformer.wte.weight"); optional "model_id" (string).
    The GistNet's architecture comes from the tree's meta.json.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "gistnet" not in ck:
        raise UserError(f"{path}: expected a dict with a 'gistnet' state_dict")
    wte = ck.get("wte")
    for key in ("model", "gpt"):
        if wte is None and isinstance(ck.get(key), dict):
            sd = {k.removeprefix("_orig_mod."): v for k, v in ck[key].items()}
            wte = sd.get("transformer.wte.weight")
    if wte is None:
        raise UserError(f"{path}: no token embedding ('wte' or a GPT state_dict with transformer.wte.weight)")
    arch = meta.get("gistnet_arch") or {}
    cfg = MCConfig.from_dict(meta["mc_config"])
    cfg.gist_layers, cfg.gist_pool = arch.get("n_layer", cfg.gist_layers), arch.get("pool", cfg.gist_pool)
    gistnet = GistNet(meta["dim"], cfg, arch.get("n_head") or cfg.gist_heads or 1)
    try:
        gistnet.load_state_dict(ck["gistnet"])
    except RuntimeError as e:
        raise UserError(f"{path}: GistNet weights do not fit the tree's GistNet architecture {arch}: {e}") from None
    return gistnet, nn.Embedding.from_pretrained(wte.float()), ck.get("model_id")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Inspect a MegaContext tree or recompute its gists (regist).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="print counts, identity and format of a tree")
    p_info.add_argument("dir")
    p_reg = sub.add_parser("regist", help="recompute every gist from the stored tokens")
    p_reg.add_argument("dir")
    p_reg.add_argument("--checkpoint", required=True,
                       help="torch file with 'gistnet' (state_dict) and 'wte' or a GPT state_dict under 'model'")
    p_reg.add_argument("--model-id", default=None, help="model identity to record (default: the checkpoint's)")
    p_reg.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    meta = read_meta(args.dir)
    if args.cmd == "info":
        counts = []
        for L in range(MCConfig.from_dict(meta["mc_config"]).max_level + 1):
            s = DiskLevel.open(level_path(args.dir, L), L)
            counts.append(s.count)
            s.close()
        print(f"tree {args.dir}: {counts[0]} tokens, counts per level {counts}")
        print(f"model_id {meta['model_id']!r}, gistnet {meta['gistnet']}, dim {meta['dim']}")
        return
    gistnet, wte, ck_model_id = load_gist_checkpoint(args.checkpoint, meta)
    gistnet.to(args.device)
    wte.to(args.device)
    model_id = args.model_id if args.model_id is not None else (ck_model_id or meta["model_id"])
    tree = MCTree.open(args.dir, gistnet, wte, model_id=model_id)
    tree.regist(progress=True)
    tree.close()
    print(f"re-gisted {args.dir}: counts {tree.level_counts()}, gistnet {gistnet_fingerprint(gistnet)}")


if __name__ == "__main__":
    run_main(main)
