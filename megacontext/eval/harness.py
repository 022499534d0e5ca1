"""
The evaluation harness that scripts/mc_eval.py drives: held-out text, one example per (task, multiple,
trial) drawn from its own generator, every method's context built at the same budget and read by greedy
decoding (exact-match tasks) or continuation loss (long documents).

Same budget, checked per example (`check_same_budget`): the baselines read exactly the same number of GPT
input slots, the focused methods never more.
"""
import dataclasses

import numpy as np
import torch

from nanochat.common import UserError
from megacontext.eval.baselines import (FOCUSED, MC_METHODS, answer_matches, boundary_level, build_contexts,
                                        continuation_nll, greedy_decode, shows_span)
from megacontext.eval import stats
from megacontext.eval.quality import doc_windows
from megacontext.eval.report import EXACT_TASKS, mean_or_none

TASK_IDS = {"passkey": 1, "needle": 2, "kv_recall": 3, "long_doc": 4, "quality": 5, "chat_memory": 6, "qa1": 7,
            "qa2": 8, "qa3": 9}
VIEW_IDS = {"raw": 0, "chat": 1}
# mc_eval's task names -> tasks.longctx's plan builders
GENERATORS = {"passkey": "passkey", "needle": "multikey", "kv_recall": "kv_recall", "chat_memory": "chat_memory",
              "qa1": "qa1", "qa2": "qa2", "qa3": "qa3"}
STORY_TASKS = ("qa1", "qa2", "qa3")  # bAbI-style: the answer needs every supporting fact (all the needles)
RAW_TASKS = ("passkey", "needle", "kv_recall") + STORY_TASKS  # exact-match tasks asked in raw text
CHAT_TASKS = ("passkey", "needle", "kv_recall", "chat_memory") + STORY_TASKS  # asked the way users ask, in chat
# the chat view read through the runtime: MCSession.chat on the ingested conversation, and the same after the
# memory was saved to disk and reopened
SESSION_METHODS = ("session", "session_reopened")


class CachedTokenizer:
    """Memoizes encode() of long strings: the task generators re-encode the whole filler every example. Every
    other attribute (chat special tokens, render_turn, ...) is the wrapped tokenizer's."""

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

    def __getattr__(self, name):
        return getattr(self.tok, name)


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


def example_rng(seed, task, multiple, trial, view="raw"):
    """One generator per example: the same example whatever other flags (methods, trials) say. A fractional
    multiple (a history shorter than the budget, where full attention fits) draws from its own seeds."""
    m = int(multiple) if float(multiple).is_integer() else 1_000_000 + int(round(float(multiple) * 1000))
    return np.random.default_rng([seed, TASK_IDS[task], m, int(trial), VIEW_IDS[view]])


def make_example(task, filler, tok, rng, n_tokens, depth=None, view="raw", split="eval"):
    """(LongCtxExample, ChatExample or None): the evaluation half of the task (tasks/splits.py: wording, names
    and keys that training never used) in `filler`, asked in raw text or as a conversation (its raw form: the
    conversation's tokens, the answer being the reference reply)."""
    from tasks.chat_view import chat_example, chat_to_raw
    from tasks.longctx import raw_example
    name = GENERATORS[task]
    if view == "raw":
        return raw_example(name, filler, tok, rng, n_tokens, split=split, depth=depth), None
    chat = chat_example(name, filler, tok, rng, n_tokens, split=split, depth=depth)
    return chat_to_raw(chat, tok), chat


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


def reply_text(tok, ids):
    """The decoded reply, up to the first <|assistant_end|> or <|bos|> (left out)."""
    from nanochat.tokenizer import chat_stop_ids
    stops = chat_stop_ids(tok)
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tok.decode(ids[:cut])


def scored(ex, chat, text):
    """Exact match of a raw answer (answer_matches); a chat reply is scored strictly on its plan (the asked
    value named, no other value of its kind: tasks.longctx.score_reply)."""
    from tasks.longctx import score_reply
    return score_reply(ex.plan, text) if chat is not None else answer_matches(text, ex.answer)


@torch.no_grad()
def session_reply(models, ex, chat, budget, reopen=False):
    """The chat view read through the runtime: the conversation up to the question ingested into an MCSession
    (optionally saved to disk and reopened), then MCSession.chat(question), greedily."""
    import tempfile
    from megacontext.runtime import MCSession
    gpt, gistnet, lensnet, tok, cfg, reranker = models
    tok = getattr(tok, "tok", tok)
    cfg = cfg if cfg.budget == budget else dataclasses.replace(cfg, budget=budget)
    question = chat.messages[-1]["content"]
    n_new = ex.answer_span[1] - ex.answer_span[0] + 4
    with tempfile.TemporaryDirectory() as d:
        def session():
            return MCSession(gpt, gistnet, lensnet, tok, cfg, memory_dir=d if reopen else None, reranker=reranker)
        s = session()
        s.ingest(ex.ids[:ex.question_start])
        if reopen:
            s.save()
            s.close()
            s = session()
        text = "".join(s.chat(question, max_tokens=n_new, temperature=0.0))
        s.close()
    return text


@torch.no_grad()
def eval_example(ex, models, methods, budget, chat=None):
    """{method: (correct or None, slots or None, needle raw in the context or None)} for one example; `chat`: its
    conversation when it is asked in chat (the session methods read that through MCSession)."""
    gpt, gistnet, lensnet, tok, cfg, reranker = models
    hist = ex.ids[:ex.answer_span[0]]  # history + question: the question is the present (raw tail)
    n_new = ex.answer_span[1] - ex.answer_span[0] + 1  # one more token, so an extra digit is seen
    if chat is not None:
        n_new += 3  # a reply may word itself differently: room to finish it
    ctx_methods = [m for m in methods if m not in SESSION_METHODS]
    tree = make_tree(hist, gistnet, gpt, cfg) if any(m in MC_METHODS for m in ctx_methods) else None
    asked = (getattr(ex, "key_spans", None) or ex.needle_spans)[0]  # the key's tokens when known
    # what the oracle opens: the asked needle (a multi-key's other needles are other keys), or every supporting fact
    needed = list(ex.needle_spans) if ex.plan is not None and ex.plan.task in STORY_TASKS else [ex.needle_spans[0]]
    ctxs = build_contexts(hist, budget, cfg, gpt, ctx_methods, gistnet, lensnet, tree, reranker, tok=tok,
                          needed_spans=needed + ([asked] if asked not in needed else []))
    check_same_budget(ctxs, f"{len(hist)} tokens")
    out = {}
    for m, c in ctxs.items():
        if c is None:
            out[m] = (None, None, None)
            continue
        ok = scored(ex, chat, reply_text(tok, greedy_decode(gpt, c, n_new)))
        out[m] = (ok, c.slots, shows_span(c, asked, cfg.block_size))
    for m in methods:
        if m in SESSION_METHODS:
            out[m] = (None, None, None) if chat is None else \
                (scored(ex, chat, session_reply(models, ex, chat, budget, reopen=m == "session_reopened")), None, None)
    return out


def run_exact_task(task, models, methods, budget, multiples, trials, depths, filler, seed, progress=True,
                   view="raw"):
    """Accuracy, slots and hit rates (the asked needle raw in the context) per multiple and method (+ per depth and
    per needle alignment, `boundary_level` of the needle sentence, for passkey), and each accuracy's trial count
    and 95 % Wilson interval ({multiple: {method: {"n", "ci"}}}). view: "raw" or "chat" (the task asked as a
    conversation; the session methods apply there only)."""
    from tqdm import tqdm
    tok = models.tok
    acc, slots, hits, by_depth, by_align, intervals = {}, {}, {}, {}, {}, {}
    bar = tqdm(total=len(multiples) * trials, desc=f"{task} ({view})", disable=not progress, leave=False)
    skipped = []
    for mult in multiples:
        recs = []
        for t in range(trials):
            depth = depths[t % len(depths)] if task == "passkey" and depths else None  # None: a random depth
            try:
                ex, chat = make_example(task, filler, tok, example_rng(seed, task, mult, t, view), int(mult * budget),
                                        depth, view)
            except ValueError as e:  # the history cannot hold the needles (a tiny budget): the cell is null
                if "too short" not in str(e):
                    raise
                skipped.append(f"{task} ({view}) {mult}x: {e}")
                bar.update(trials - t)
                break
            align = (boundary_level(ex.needle_spans[0], models.cfg.block_size, models.cfg.max_level)
                     if task == "passkey" else None)
            recs.append((depth, eval_example(ex, models, methods, budget, chat), align))
            bar.update(1)
        recs = recs if len(recs) == trials else []
        k = str(mult)
        cells = {m: stats.cell(r[m][0] for _, r, _ in recs) for m in methods}
        acc[k] = {m: c["acc"] for m, c in cells.items()}
        intervals[k] = {m: {"n": c["n"], "ci": c["ci"]} for m, c in cells.items()}
        slots[k] = {m: mean_or_none(r[m][1] for _, r, _ in recs) for m in methods}
        hits[k] = {m: mean_or_none(r[m][2] for _, r, _ in recs) for m in methods
                   if m not in ("truncation", "sinks", "full") + SESSION_METHODS}
        if task == "passkey" and depths:
            by_depth[k] = {str(d): {m: mean_or_none(r[m][0] for dd, r, _ in recs if dd == d) for m in methods}
                           for d in depths}
        if task == "passkey":
            by_align[k] = {str(L): {"n": sum(a == L for *_, a in recs),
                                    **{m: mean_or_none(r[m][0] for _, r, a in recs if a == L) for m in methods}}
                           for L in sorted({a for *_, a in recs})}
    bar.close()
    return acc, slots, hits, by_depth, by_align, skipped, intervals


@torch.no_grad()
def run_long_doc(models, methods, budget, texts, doc_tokens, target, n_docs, progress=True):
    """Mean NLL (nats/token) of each window's last `target` tokens given the rest, per method; gap closed. Prose has
    no answer span (no oracle) and no conversation (no session); bm25 queries with the newest tokens."""
    from tqdm import tqdm
    gpt, gistnet, lensnet, tok, cfg, reranker = models
    methods = [m for m in methods if m not in ("oracle",) + SESSION_METHODS]
    windows = doc_windows(texts, tok, doc_tokens, n_docs)
    sums = {m: 0.0 for m in methods}
    counts = {m: 0 for m in methods}
    for w in tqdm(windows, desc="long_doc", disable=not progress, leave=False):
        hist, tgt = w[:-target], w[-target:]
        tree = make_tree(hist, gistnet, gpt, cfg) if any(m in MC_METHODS for m in methods) else None
        ctxs = build_contexts(hist, budget, cfg, gpt, methods, gistnet, lensnet, tree, reranker, tok=tok)
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
        for cell in res.get(task, {}).values():
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
