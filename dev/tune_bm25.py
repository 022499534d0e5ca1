"""
Tune the BM25 baseline's block choice (megacontext/eval/bm25.py) on training-style examples: the task generators
of tasks/longctx.py with the training wording (MULTI_QUESTIONS) and the sizes midtraining draws (tasks/mc_mixture.py:
2-4 keys and 0-2 decoys, 2-7 records), the filler from the training shards (or --filler random: the same words
shuffled). Never the evaluation's wording, filler or numbers.

    OMP_NUM_THREADS=1 python -m dev.tune_bm25 [--base-dir DIR] [--trials 20] [--multiples 1,4,16,64,256]

The figure is the block-hit rate: the share of examples whose needle (its first word through the key's last digit,
the asked needle of multi-key) is raw in the bm25 WC at the budget; `top1`: BM25's best block touches it; `other`:
another key's needle or a decoy is raw too (what misled the GPT when focus opened more than it needed; focus.py).
Three stages, each from the pick of the one before (`stage`: the best hit, ties within --tol to top-1 and fewer
other needles): tokenization and query (at bm25s's k1 1.5, b 0.75), then k1 x b,
then the WC policy (neighbours, order, blocks, folds). The last table is per task and history multiple.
The base dir is only read (tokenizer/ and base_data/).
"""
import argparse
import os
import time
from dataclasses import replace

import numpy as np

from megacontext.config import MCConfig
from megacontext.eval import bm25 as rag
from megacontext.eval.baselines import shared_length, span_is_raw
from tasks.longctx import key_span, kv_recall, multikey, passkey

TASKS = ("passkey", "multikey", "kv_recall")
SEED = 20261207  # not the evaluation's seeds (and its filler and wording differ anyway)


class Tok:
    """The tokenizer with encode() memoized (the generators re-encode the whole filler every example)."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}

    def encode(self, text):
        if text not in self.cache:
            self.cache[text] = list(self.tok.encode(text))
        return self.cache[text]

    def decode(self, ids):
        return self.tok.decode(ids)


def load(base_dir, filler_kind, max_chars=400_000):
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import Tokenizer
    tok = Tok(Tokenizer.from_directory(os.path.join(base_dir, "tokenizer")))
    parts, n = [], 0
    for batch in parquets_iter_batched("train", data_dir=os.path.join(base_dir, "base_data")):
        parts += batch
        n += sum(map(len, batch))
        if n >= max_chars:
            break
    filler = "\n\n".join(parts)[:max_chars]  # tasks/mc_mixture.py: load_filler, the training shards' start
    if filler_kind == "random":
        words = filler.split()
        filler = " ".join(np.random.default_rng(SEED).permutation(words).tolist())
    return tok, filler


def example(task, filler, tok, mult, budget, trial):
    """(history ids, the needle's core span, the other needles' and decoys' spans) of one training-style example."""
    rng = np.random.default_rng([SEED, TASKS.index(task), mult, trial])
    s = mult * budget
    if task == "passkey":
        ex = passkey(filler, tok, rng, s)
    elif task == "multikey":
        ex = multikey(filler, tok, rng, s, n_keys=int(rng.integers(2, 5)), n_decoys=int(rng.integers(0, 3)))
    else:
        ex = kv_recall(filler, tok, rng, s, n_pairs=int(rng.integers(2, 8)))
    hist = ex.ids[:ex.answer_span[0]]
    a, _ = ex.needle_spans[0]
    while not tok.decode([hist[a]]).strip():  # the needle's first word (not the space before it)
        a += 1
    _, b = key_span(ex.ids, ex.needle_spans[0], tok.encode(ex.answer.strip()))
    return hist, (a, b), ex.needle_spans[1:] + ex.decoy_spans


class Bench:
    """The examples with their decoded pieces, and a cache of what each setting's stages compute."""

    def __init__(self, examples, tok, cfg):
        self.ex, self.cfg, self.cache = examples, cfg, {}
        self.pieces = [rag.token_pieces(h, tok) for _, _, h, _, _ in examples]

    def _get(self, key, fn):
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def retrieve(self, i, s):
        """(scores, terms, pos, query) of example i under settings s (cached by the fields each step reads)."""
        tk = (i, s.stopwords, s.stem)
        terms, pos = self._get(tk, lambda: rag.history_words(self.pieces[i], s))
        query = self._get(tk + (s.query,), lambda: rag.query_terms(self.pieces[i], self.cfg, s))
        nb = rag.num_candidates(len(self.pieces[i]), self.cfg)
        docs = self._get(tk + ("docs", s.margin), lambda: rag.block_docs(terms, pos, nb, self.cfg.block_size, s.margin))
        scores = self._get(tk + (s.query, s.margin, s.k1, s.b), lambda: rag.bm25_scores(docs, query, s.k1, s.b))
        return scores, terms, pos, query

    def run(self, s):
        """{(task, mult): [hit, truncate hit, top1, other, oracle hit]} under settings s."""
        K, budget, cfg = self.cfg.block_size, self.cfg.budget, self.cfg
        out = {}
        for i, (task, mult, hist, core, others) in enumerate(self.ex):
            n = len(hist)
            scores, terms, pos, query = self.retrieve(i, s)
            groups = rag.block_plan(scores, terms, pos, query, K, s)
            wc = rag.open_plan(n, budget, cfg, groups, scores, s)
            shown = rag.rag_tokens(n, shared_length(n, budget, cfg), cfg, groups, s)
            top = int(np.argmax(scores)) if len(scores) and scores.max() > 0 else -1
            row = [span_is_raw(wc, core, K), bool(np.isin(np.arange(*core), shown).all()),
                   core[0] // K <= top <= (core[1] - 1) // K or n <= budget,
                   any(span_is_raw(wc, o, K) for o in others),
                   self._get((i, "oracle"), lambda: span_is_raw(rag.open_needed(n, budget, cfg, [core]), core, K))]
            out.setdefault((task, mult), []).append(row)
        return {k: np.mean(v, axis=0) for k, v in out.items()}


def summary(res, multiples):
    """Mean over the cells of hit, top1, other; and the hit per multiple (mean over tasks)."""
    m = np.mean(list(res.values()), axis=0)
    per = [np.mean([res[(t, mu)][0] for t in TASKS]) for mu in multiples]
    return m[0], m[2], m[3], per


def fmt_row(name, res, multiples):
    hit, top1, other, per = summary(res, multiples)
    return f"| {name} | {100 * hit:.1f} | {100 * top1:.1f} | {100 * other:.1f} | " + \
        " | ".join(f"{100 * p:.0f}" for p in per) + " |"


def stage(title, bench, variants, multiples, tol):
    """
    Run every (name, settings) and print a table. The pick: the best hit; among those within `tol` of it (a few
    examples: noise), the best top-1, then (within tol) the fewest other needles raw, then the first listed (the
    variants are listed simplest first).
    """
    head = f"| {title} | hit % | top1 % | other % | " + " | ".join(f"{m}x" for m in multiples) + " |"
    print("\n" + head + "\n" + "|---" * (4 + len(multiples)) + "|")
    rows = []
    for name, s in variants:
        res = bench.run(s)
        print(fmt_row(name, res, multiples), flush=True)
        rows.append((s, *summary(res, multiples)[:3]))
    keep = [r for r in rows if r[1] >= max(r[1] for r in rows) - tol]
    keep = [r for r in keep if r[2] >= max(r[2] for r in keep) - tol]
    keep = [r for r in keep if r[3] <= min(r[3] for r in keep) + tol]
    return keep[0][0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-dir", default=None, help="a runcpu base dir with tokenizer/ and base_data/ "
                                                     "(default: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat)")
    p.add_argument("--budget", type=int, default=224, help="the runcpu checkpoint's budget")
    p.add_argument("--tail-tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=20, help="examples per task and multiple")
    p.add_argument("--multiples", default="1,4,16,64,256")
    p.add_argument("--filler", choices=("train", "random"), default="train")
    p.add_argument("--final-only", action="store_true", help="only the per-task table of the module's settings")
    p.add_argument("--tol", type=float, default=0.5, help="percentage points of hit (and top-1, other) that are noise")
    args = p.parse_args(argv)
    multiples = [int(x) for x in args.multiples.split(",")]
    cfg = MCConfig(budget=args.budget, tail_tokens=args.tail_tokens)
    t0 = time.time()
    from nanochat.common import get_base_dir
    tok, filler = load(args.base_dir or get_base_dir(), args.filler)
    examples = [(t, m, *example(t, filler, tok, m, args.budget, i)) for t in TASKS for m in multiples
                for i in range(args.trials)]
    bench = Bench(examples, tok, cfg)
    print(f"{len(examples)} examples ({args.trials} per task and multiple), budget {args.budget}, tail "
          f"{cfg.tail_tokens}, {args.filler} filler, built in {time.time() - t0:.0f} s")
    best = rag.SETTINGS
    if not args.final_only:
        base = replace(rag.SETTINGS, k1=1.5, b=0.75, neighbours="always", order="depth", max_blocks=8, folds=None)
        best = stage("tokenization, query, margin", bench, [
            (f"stop={int(sw)} stem={int(st)} query={q} margin={mg}",
             replace(base, stopwords=sw, stem=st, query=q, margin=mg))
            for sw in (True, False) for st in (False, True) for q in ("window", "line") for mg in (0, 4, 8, 16)],
            multiples, args.tol / 100)
        best = stage("k1, b", bench, [(f"k1={k1} b={b}", replace(best, k1=k1, b=b))
                                      for k1 in (0.5, 0.9, 1.2, 1.5, 2.0) for b in (0.0, 0.25, 0.5, 0.75, 1.0)],
                     multiples, args.tol / 100)
        best = stage("neighbours, order, blocks, folds", bench, [
            (f"{nb}{'' if nb != 'edge' else f' {e}'} {o} max={mb} folds={'cfg' if f is None else f}",
             replace(best, neighbours=nb, edge=e, order=o, max_blocks=mb, folds=f))
            for nb, e in (("none", 8), ("always", 8), ("edge", 4), ("edge", 8), ("edge", 12), ("edge", 16))
            for o in ("depth", "breadth") for mb in (2, 3, 4, 6, 8, 16) for f in (None, 8)], multiples, args.tol / 100)
        print(f"\nbest: {best}")
    # the chosen settings per task and multiple
    res = bench.run(best)
    print("\n| task | " + " | ".join(f"{m}x" for m in multiples) + " |\n" + "|---" * (1 + len(multiples)) + "|")
    for t in TASKS:
        cells = [res[(t, m)] for m in multiples]
        print(f"| {t} | " + " | ".join("/".join(f"{100 * c[j]:.0f}" for j in (0, 1, 4, 2, 3)) for c in cells) + " |")
    print("(each cell, %: bm25 hit / bm25_truncate hit / oracle hit / BM25's top-1 / another needle raw in bm25)")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
