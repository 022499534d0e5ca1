"""
Compression ratio of the trained tokenizer (UTF-8 bytes per token; higher = more text per token)
on a few fixed samples and on documents from the train and val shards, printed as a table.

    python -m scripts.tok_eval [--docs 200]
"""
import argparse

from nanochat.common import run_main
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import get_tokenizer

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. In the beginning was the word, and the word "
               "was written down, copied, and read again by people who had never met its author.",
    "verse": "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
             "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.",
    "code": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
            "print([fib(i) for i in range(10)])\n",
    "math": "Let f(x) = 3x^2 + 2x - 7. Then f'(x) = 6x + 2, and f(1.5) = 6.75 + 3 - 7 = 2.75.",
    "unicode": "Grüße aus Köln! Ελληνικά, русский, 日本語, 한국어 🙂 — naïve café façade.",
}


def shard_sample(split, max_docs):
    docs = []
    for batch in parquets_iter_batched(split):
        docs.extend(batch)
        if len(docs) >= max_docs:
            break
    return "\n".join(docs[:max_docs])


def compression_table(tokenizer, texts):
    """[(name, bytes, tokens, bytes/token)] for each named text."""
    rows = []
    for name, text in texts.items():
        n_bytes, n_tokens = len(text.encode("utf-8")), len(tokenizer.encode(text))
        rows.append((name, n_bytes, n_tokens, n_bytes / max(1, n_tokens)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Report the tokenizer's compression ratio (bytes/token).")
    parser.add_argument("--docs", type=int, default=200, help="documents to sample from each of train and val")
    args = parser.parse_args(argv)
    tokenizer = get_tokenizer()
    texts = dict(SAMPLES)
    texts["train"] = shard_sample("train", args.docs)
    texts["val"] = shard_sample("val", args.docs)
    rows = compression_table(tokenizer, texts)
    print(f"tokenizer vocab size: {tokenizer.get_vocab_size()}")
    print(f"{'text':<10} {'bytes':>10} {'tokens':>10} {'bytes/token':>12}")
    for name, n_bytes, n_tokens, ratio in rows:
        print(f"{name:<10} {n_bytes:>10,} {n_tokens:>10,} {ratio:>12.3f}")
    from nanochat.report import get_report
    get_report().log(section="Tokenizer evaluation", data=[
        {"vocab_size": tokenizer.get_vocab_size()},
        {f"bytes_per_token_{name}": round(ratio, 3) for name, _, _, ratio in rows}])


if __name__ == "__main__":
    run_main(main)
