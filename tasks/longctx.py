"""
Synthetic long-context tasks (docs/architecture.md): facts hidden in natural-text filler,
asked about at the end. Every generator takes filler text, a tokenizer (anything with
`encode(text) -> list[int]`) and a numpy Generator, and returns a `LongCtxExample`:

    ids           the token ids: [filler with needles ... | question | answer | "."]
    answer_span   (a, b): ids[a:b] are the answer tokens and the "." that ends them, as in the needle
                  (a model trained on the span learns to stop the number: scoring rejects extra digits)
    question_start  where the question begins (history = ids[:question_start])
    needle_spans  token spans of the needles; needle_spans[0] holds the asked one
    decoy_spans   token spans of near-miss decoys (multi-key needle)
    answer        the answer text

Pieces are tokenized separately and concatenated, so the answer's tokens (and every span) are exact
whatever the tokenizer merges across piece boundaries.

- `passkey`: one 5-digit key in filler, varied needle and question wording.
- `multikey`: several keys labelled by colour; near-miss decoys use the ASKED colour with another
  noun ("the red code is ..."), so only reading the question and the needle together answers it.
  Training asks with MULTI_QUESTIONS, evaluation with MULTI_QUESTIONS_HELDOUT (wording never trained on).
- `kv_recall`: many `key -> value` records scattered in filler; the question names one key.
"""
from dataclasses import dataclass, field

import numpy as np

PASSKEY_NEEDLES = [
    " The pass key is {key}. Remember it. ",
    " Remember this: the pass key is {key}. ",
    " Note that the secret pass key is {key}. ",
    " By the way, the pass key is {key}. ",
]
PASSKEY_QUESTIONS = [
    "\nWhat is the pass key? The pass key is",
    "\nQuestion: what was the pass key mentioned above? The pass key is",
    "\nRecall the secret number. The pass key is",
]
ANSWER_END = "."  # ends every answer, as the needles end their keys
COLOURS = ["red", "blue", "green", "gold", "gray", "pink", "teal", "navy", "lime", "rose"]
MULTI_NEEDLES = [" The {c} key is {key}. ", " Note: the {c} key is {key}. "]
MULTI_DECOYS = [" The {c} code is {key}. ", " A {c} lock was {key}. ", " The {c} door is {key}. "]
MULTI_QUESTIONS = [  # the wording midtraining asks with
    "\nWhat is the {c} key? The {c} key is",
    "\nQuestion: which number is the {c} key? The {c} key is",
    "\nRecall the number given for the {c} key. The {c} key is",
]
MULTI_QUESTIONS_HELDOUT = [  # never trained on: scripts/mc_eval.py asks with these
    "\nTell me the {c} key from the text above. The {c} key is",
    "\nWhich value did the {c} key have? The {c} key is",
]
KV_WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "ember", "frost", "pearl", "cedar", "quill",
            "amber", "delta", "lotus", "raven", "sable", "coral", "ivory", "onyx", "willow"]


@dataclass
class LongCtxExample:
    ids: list
    answer_span: tuple
    question_start: int
    answer: str
    needle_spans: list = field(default_factory=list)
    decoy_spans: list = field(default_factory=list)
    key_spans: list = field(default_factory=list)  # token spans of the key digits inside each needle


def random_key(rng, digits=5):
    return "".join(str(d) for d in rng.integers(0, 10, digits))


def _filler_ids(filler, tokenizer, rng, n_tokens):
    """n_tokens of filler starting at a random point (the filler text is repeated if too short)."""
    ids = list(tokenizer.encode(filler))
    if not ids:
        raise ValueError("filler text encodes to no tokens")
    reps = -(-(n_tokens + len(ids)) // len(ids))
    ids = ids * reps
    start = int(rng.integers(0, len(ids) - n_tokens + 1))
    return ids[start:start + n_tokens]


def _assemble(filler, tokenizer, rng, n_tokens, inserts, question, answer, depths=None):
    """
    Filler of about n_tokens history tokens with `inserts` (texts) placed at increasing random depths
    (or the given fractions), then the question and the answer. Returns (ids, insert spans in the order
    given, question_start, answer_span).
    """
    enc = [list(tokenizer.encode(t)) for t in inserts]
    fill_n = n_tokens - sum(len(e) for e in enc)
    if fill_n < len(inserts) + 1:
        raise ValueError(f"history of {n_tokens} tokens is too short for {len(inserts)} needles "
                         f"({sum(len(e) for e in enc)} tokens)")
    fill = _filler_ids(filler, tokenizer, rng, fill_n)
    if depths is None:
        cuts = np.sort(rng.choice(np.arange(1, fill_n), size=len(inserts), replace=False))
        order = rng.permutation(len(inserts))  # which insert goes at which depth
    else:
        cuts = np.clip((np.asarray(depths, dtype=float) * fill_n).astype(int), 0, fill_n)
        order = np.argsort(cuts, kind="stable")
        cuts = cuts[order]
    ids, spans, prev = [], [None] * len(inserts), 0
    for cut, k in zip(cuts.tolist(), order.tolist()):
        ids += fill[prev:cut]
        spans[k] = (len(ids), len(ids) + len(enc[k]))
        ids += enc[k]
        prev = cut
    ids += fill[prev:]
    q = len(ids)
    ids += list(tokenizer.encode(question))
    a = len(ids)
    ids += list(tokenizer.encode(answer)) + list(tokenizer.encode(ANSWER_END))
    return ids, spans, q, (a, len(ids))


def key_span(ids, span, key_ids):
    """The token span of key_ids inside ids[span] (the last occurrence: the key ends the sentence's clause)."""
    a, b = span
    n = len(key_ids)
    for i in range(b - n, a - 1, -1):
        if ids[i:i + n] == key_ids:
            return (i, i + n)
    raise ValueError("key tokens not found inside the needle (a tokenizer merged them with their neighbours)")


def passkey(filler, tokenizer, rng, n_tokens, depth=None, key=None, key_in_block=0):
    """
    One 5-digit pass key at `depth` (fraction of the history, default random) in ~n_tokens of filler.
    key_in_block=K > 0 resamples the placement until the key's tokens lie inside one aligned K-token
    block (one expanded block then holds the whole answer).
    """
    key = key or random_key(rng)
    needle = PASSKEY_NEEDLES[int(rng.integers(len(PASSKEY_NEEDLES)))].format(key=key)
    question = PASSKEY_QUESTIONS[int(rng.integers(len(PASSKEY_QUESTIONS)))]
    key_ids = list(tokenizer.encode(key))
    for _ in range(1000):
        ids, spans, q, ans = _assemble(filler, tokenizer, rng, n_tokens, [needle], question, " " + key,
                                       None if depth is None else [depth])
        ks = key_span(ids, spans[0], key_ids)
        if not key_in_block or ks[0] // key_in_block == (ks[1] - 1) // key_in_block:
            return LongCtxExample(ids, ans, q, " " + key, needle_spans=spans, key_spans=[ks])
        if depth is not None:  # a fixed depth cannot move: nudge it by a few tokens
            depth = min(1.0, depth + 7.0 / max(n_tokens, 1))
    raise ValueError(f"could not place the key inside one {key_in_block}-token block")


def multikey(filler, tokenizer, rng, n_tokens, n_keys=4, n_decoys=2, questions=MULTI_QUESTIONS):
    """n_keys colour-labelled keys (the first one asked) + n_decoys near misses with the asked colour, asked
    with one of `questions` (the training wording by default; MULTI_QUESTIONS_HELDOUT for evaluation)."""
    if not 1 <= n_keys <= len(COLOURS):
        raise ValueError(f"n_keys must be in 1..{len(COLOURS)}, got {n_keys}")
    cols = [COLOURS[i] for i in rng.choice(len(COLOURS), n_keys, replace=False)]
    keys = [random_key(rng) for _ in range(n_keys + n_decoys)]
    while len(set(keys)) < len(keys):
        keys = [random_key(rng) for _ in range(n_keys + n_decoys)]
    ask = cols[0]
    needles = [MULTI_NEEDLES[int(rng.integers(len(MULTI_NEEDLES)))].format(c=c, key=k) for c, k in zip(cols, keys)]
    decoys = [MULTI_DECOYS[i % len(MULTI_DECOYS)].format(c=ask, key=k) for i, k in enumerate(keys[n_keys:])]
    question = questions[int(rng.integers(len(questions)))].format(c=ask)
    ids, spans, q, ans = _assemble(filler, tokenizer, rng, n_tokens, needles + decoys, question, " " + keys[0])
    return LongCtxExample(ids, ans, q, " " + keys[0], needle_spans=spans[:n_keys], decoy_spans=spans[n_keys:])


def kv_recall(filler, tokenizer, rng, n_tokens, n_pairs=6):
    """n_pairs records `key -> 5-digit value` scattered in filler; the question names the first key."""
    if not 1 <= n_pairs <= len(KV_WORDS):
        raise ValueError(f"n_pairs must be in 1..{len(KV_WORDS)}, got {n_pairs}")
    names = [KV_WORDS[i] for i in rng.choice(len(KV_WORDS), n_pairs, replace=False)]
    vals = [random_key(rng) for _ in names]
    recs = [f" Record: {k} -> {v}. " for k, v in zip(names, vals)]
    question = f"\nLook up the record. {names[0]} ->"
    ids, spans, q, ans = _assemble(filler, tokenizer, rng, n_tokens, recs, question, " " + vals[0])
    return LongCtxExample(ids, ans, q, " " + vals[0], needle_spans=spans)


TASKS = {"passkey": passkey, "multikey": multikey, "kv_recall": kv_recall}
