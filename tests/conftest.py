"""
Shared fixtures. `tiny_base_dir` builds, once per session, a base dir with a tiny synthetic corpus
(4 train shards + 1 val shard) and a trained tokenizer (vocab 512), in about a second, offline.

    def test_x(tiny_base_env):           # function-scoped: a fresh base dir, NANOCHAT_BASE_DIR set
        tok = get_tokenizer()            # tokenizer/ and base_data/ are there (copies)
    def test_y(tiny_base_dir):           # session-scoped path; treat it as read-only
"""
import os
import random
import shutil

import pytest

TINY_VOCAB = 512

_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
          "have an they you were her she there been one all we their has would when if so no what more out up "
          "king queen lord night sword crown castle river winter summer light shadow memory question answer "
          "number seven eleven forty key door garden letter").split()
_EXTRAS = ["café", "naïve", "Grüße", "日本語", "Ελληνικά", "🙂", "½", "3.14159", "2024-01-31", "x = y + 1;",
           "def f(x):\n    return x * 2\n"]


def synthetic_docs(n=240, seed=0, min_words=20, max_words=120):
    """Deterministic pseudo-English documents with digits, code and some non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), rng.choice(_EXTRAS))
            if rng.random() < 0.3:
                words.append(str(rng.randint(0, 99999)))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ";"]))
        words_left = rng.randint(min_words, max_words)
        text = " ".join(sentences)
        while len(text.split()) < words_left:
            text += "\n\n" + " ".join(rng.choice(_WORDS) for _ in range(12)) + "."
        docs.append(f"Document {i}. " + text)
    return docs


def build_tiny_base_dir(base_dir, n_docs=240, vocab_size=TINY_VOCAB, num_train_shards=4, row_group_size=6):
    """Write base_data/ shards and a trained tokenizer/ under base_dir (no network, ~1 s)."""
    from nanochat.dataset import write_shards, parquets_iter_batched
    from nanochat.tokenizer import Tokenizer
    data_dir = os.path.join(base_dir, "base_data")
    write_shards(synthetic_docs(n_docs), data_dir, num_train_shards=num_train_shards, val_frac=0.1,
                 row_group_size=row_group_size)
    texts = (t for batch in parquets_iter_batched("train", data_dir=data_dir) for t in batch)
    tok = Tokenizer.train_from_iterator(texts, vocab_size)
    tok.save(os.path.join(base_dir, "tokenizer"))
    return base_dir


@pytest.fixture(scope="session")
def tiny_docs():
    """The documents stored in tiny_base_dir's shards, in order (the last 24 are the val shard)."""
    return synthetic_docs(240)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """Path (str) of a session-wide base dir holding base_data/ and tokenizer/. Do not write into it."""
    return build_tiny_base_dir(str(tmp_path_factory.mktemp("tiny_base")))


@pytest.fixture
def tiny_base_env(tiny_base_dir, tmp_path, monkeypatch):
    """A fresh per-test base dir (copies of the session corpus and tokenizer) set as NANOCHAT_BASE_DIR."""
    base = tmp_path / "base"
    for sub in ("base_data", "tokenizer"):
        shutil.copytree(os.path.join(tiny_base_dir, sub), base / sub)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return str(base)
