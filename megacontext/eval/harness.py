"""
The evaluation harness that scripts/mc_eval.py drives: held-out text, one example per (task, multiple,
trial) drawn from its own generator, every method's context built at the same budget and read by greedy
decoding (exact-match tasks) or continuation loss (long documents).

Same budget, checked per example (`check_same_budget`): the baselines read exactly the same number of GPT
input slots, the focused methods never more.
"""
import numpy as np
import torch

from nanochat.common import UserError
from megacontext.eval.baselines import (FOCUSED, MC_METHODS, answer_matches, boundary_level, build_contexts,
                                        continuation_nll, greedy_decode, span_is_raw)
from megacontext.eval.quality import doc_windows
from megacontext.eval.report import EXACT_TASKS, mean_or_none

TASK_IDS = {"passkey": 1, "needle": 2, "kv_recall": 3, "long_doc": 4, "quality": 5}

class CachedTokenizer:
    """Memoizes encode() of long strings: the task generators re-encode the whole filler every example."""

    def __init__(self, tok):
        self.tok, self._cache = tok, {}

    def encode(self, text):
        if len(text) < 256:
            return self.tok.encode(text)
        if text not in self._cache:
            self._cache[text] = list(self.tok.encode(text))
        return self._cache[text]

    def decode(self, ids):
        return self.tok.decode(ids)


def val_texts(max_chars):
    """Validation-shard documents in order, up to about max_chars characters (a full shard can be huge)."""
    from nanochat.dataset import parquets_iter_batched
    texts, n = [], 0
    for batch in parquets_iter_batched("val"):
        for t in batch:
            if t.strip() and n < max_chars:
                texts.append(t)
                n += len(t)
        if n >= max_chars:
            break
    if not texts:
        raise UserError("the validation shard holds no text: rebuild the data with `python -m nanochat.dataset`")
    return texts


def example_rng(seed, task, multiple, trial):
    """One generator per example: the same example whatever other flags (methods, trials) say."""
    return np.random.default_rng([seed, TASK_IDS[task], int(multiple), int(trial)])


def make_example(task, filler, tok, rng, n_tokens, depth=None):
    from tasks.longctx import MULTI_QUESTIONS_HELDOUT, kv_recall, multikey, passkey
    if task == "passkey":
        return passkey(filler, tok, rng, n_tokens, depth=depth)
    if task == "needle":  # asked with wording that midtraining never used
        return multikey(filler, tok, rng, n_tokens, questions=MULTI_QUESTIONS_HELDOUT)
    return kv_recall(filler, tok, rng, n_tokens)


def make_tree(ids, gistnet, gpt, cfg, chunk=1 << 15):
    """A RAM tree over the history (GistNet gists stored like the runtime's, in the storage dtype)."""
    from megacontext.tree import MCTree
    tree = MCTree.ram(cfg, gistnet, gpt.transformer.wte, vocab_size=gpt.config.vocab_size)
    for a in range(0, len(ids), chunk):
        tree.append(ids[a:a + chunk])
    return tree


# -----------------------------------------------------------------------------
# evaluation

def check_same_budget(ctxs, where):
    """The budgeted baselines must have read exactly the same number of GPT input slots, and the focused
    methods (FOCUSED: question_focus may stop short of the budget) no more than they did."""
    slots = {m: c.slots for m, c in ctxs.items() if c is not None and m != "full"}
    fixed = {s for m, s in slots.items() if m not in FOCUSED}
    if len(fixed) > 1 or (fixed and any(s > max(fixed) for s in slots.values())):
        raise AssertionError(f"methods read different numbers of slots at {where}: {slots}")
    return slots


@torch.no_grad()
def eval_example(ex, models, methods, budget):
    """{method: (correct or None, slots or None, needle raw in the WC or None)} for one example."""
    gpt, gistnet, lensnet, tok, cfg, reranker = models
    hist = ex.ids[:ex.answer_span[0]]  # history + question: the question is the present (raw tail)
    n_new = ex.answer_span[1] - ex.answer_span[0] + 1  # one more token, so an extra digit is seen
    tree = make_tree(hist, gistnet, gpt, cfg) if any(m in MC_METHODS for m in methods) else None
    ctxs = build_contexts(hist, budget, cfg, gpt, methods, gistnet, lensnet, tree, reranker)
    check_same_budget(ctxs, f"{len(hist)} tokens")
    out = {}
    for m, c in ctxs.items():
        if c is None:
            out[m] = (None, None, None)
            continue
        ok = answer_matches(tok.decode(greedy_decode(gpt, c, n_new)), ex.answer)
        asked = (getattr(ex, "key_spans", None) or ex.needle_spans)[0]  # the key's tokens when known
        hit = span_is_raw(c.wc, asked, cfg.block_size) if c.wc is not None else None
        out[m] = (ok, c.slots, hit)
    return out


def run_exact_task(task, models, methods, budget, multiples, trials, depths, filler, seed, progress=True):
    """Accuracy, slots and LensNet hit rates per multiple and method (+ per depth and per needle alignment,
    `boundary_level` of the needle sentence, for passkey)."""
    from tqdm import tqdm
    tok = models.tok
    acc, slots, hits, by_depth, by_align = {}, {}, {}, {}, {}
    bar = tqdm(total=len(multiples) * trials, desc=task, disable=not progress, leave=False)
    skipped = []
    for mult in multiples:
        recs = []
        for t in range(trials):
            depth = depths[t % len(depths)] if task == "passkey" and depths else None  # None: a random depth
            try:
                ex = make_example(task, filler, tok, example_rng(seed, task, mult, t), mult * budget, depth)
            except ValueError as e:  # the history cannot hold the needles (a tiny budget): the cell is null
                if "too short" not in str(e):
                    raise
                skipped.append(f"{task} {mult}x: {e}")
                bar.update(trials - t)
                break
            align = (boundary_level(ex.needle_spans[0], models.cfg.block_size, models.cfg.max_level)
                     if task == "passkey" else None)
            recs.append((depth, eval_example(ex, models, methods, budget), align))
            bar.update(1)
        recs = recs if len(recs) == trials else []
        k = str(mult)
        acc[k] = {m: mean_or_none(r[m][0] for _, r, _ in recs) for m in methods}
        slots[k] = {m: mean_or_none(r[m][1] for _, r, _ in recs) for m in methods}
        hits[k] = {m: mean_or_none(r[m][2] for _, r, _ in recs) for m in methods
                   if m not in ("truncation", "sinks", "full")}
        if task == "passkey" and depths:
            by_depth[k] = {str(d): {m: mean_or_none(r[m][0] for dd, r, _ in recs if dd == d) for m in methods}
                           for d in depths}
        if task == "passkey":
            by_align[k] = {str(L): {"n": sum(a == L for *_, a in recs),
                                    **{m: mean_or_none(r[m][0] for _, r, a in recs if a == L) for m in methods}}
                           for L in sorted({a for *_, a in recs})}
    bar.close()
    return acc, slots, hits, by_depth, by_align, skipped


@torch.no_grad()
def run_long_doc(models, methods, budget, texts, doc_tokens, target, n_docs, progress=True):
    """Mean NLL (nats/token) of each window's last `target` tokens given the rest, per method; gap closed."""
    from tqdm import tqdm
    gpt, gistnet, lensnet, tok, cfg, reranker = models
    windows = doc_windows(texts, tok, doc_tokens, n_docs)
    sums = {m: 0.0 for m in methods}
    counts = {m: 0 for m in methods}
    for w in tqdm(windows, desc="long_doc", disable=not progress, leave=False):
        hist, tgt = w[:-target], w[-target:]
        tree = make_tree(hist, gistnet, gpt, cfg) if any(m in MC_METHODS for m in methods) else None
        ctxs = build_contexts(hist, budget, cfg, gpt, methods, gistnet, lensnet, tree, reranker)
        check_same_budget(ctxs, f"long_doc {len(hist)} tokens")
        for m, c in ctxs.items():
            if c is not None:
                s, n = continuation_nll(gpt, c, tgt)
                sums[m] += s
                counts[m] += n
    nll = {m: round(sums[m] / counts[m], 4) if counts[m] else None for m in methods}
    return nll, gaps_closed(nll), len(windows)


def gaps_closed(nll):
    """Each method's share of the truncation -> full NLL gap it closes; None where undefined, including
    when full attention is not better than truncation (no gap to close)."""
    lo, hi = nll.get("full"), nll.get("truncation")
    gaps = {}
    for m, v in nll.items():
        if m in ("truncation", "full") or v is None or lo is None or hi is None or hi - lo < 1e-6:
            gaps[m] = None
        else:
            gaps[m] = round((hi - v) / (hi - lo), 4)
    return gaps


def position_verdict(res):
    """slot vs gaussian: mean accuracy over every exact-match cell; long-doc NLL breaks ties."""
    a = {"slot": [], "gaussian": []}
    for task in EXACT_TASKS:
        for cell in res[task].values():
            s, g = cell.get("megacontext"), cell.get("megacontext_gaussian")
            if s is not None and g is not None:
                a["slot"].append(s)
                a["gaussian"].append(g)
    out = {"cells": len(a["slot"]), "mean_acc_slot": mean_or_none(a["slot"]),
           "mean_acc_gaussian": mean_or_none(a["gaussian"]),
           "long_doc_nll_slot": res["long_doc"].get("megacontext"),
           "long_doc_nll_gaussian": res["long_doc"].get("megacontext_gaussian")}
    winner = None
    if out["cells"]:
        d = out["mean_acc_slot"] - out["mean_acc_gaussian"]
        winner = "slot" if d > 1e-9 else "gaussian" if d < -1e-9 else None
        if winner is None and None not in (out["long_doc_nll_slot"], out["long_doc_nll_gaussian"]):
            d = out["long_doc_nll_gaussian"] - out["long_doc_nll_slot"]
            winner = "slot" if d > 1e-6 else "gaussian" if d < -1e-6 else None
        winner = winner or "tie"
    out["winner"] = winner
    return out
