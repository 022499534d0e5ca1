"""
Train the BPE tokenizer on the train shards and save it (plus token_bytes.pt, the bytes per token
id used for bits-per-byte) to $NANOCHAT_BASE_DIR/tokenizer.

    python -m scripts.tok_train                        # nanochat defaults: 65536 tokens, 2B chars
    python -m scripts.tok_train --vocab-size 4096      # toy scale (dev/runcpu.sh)
"""
import argparse
import time

from nanochat.common import UserError, run_main
from nanochat.dataset import get_data_dir, parquets_iter_batched
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, compute_token_bytes, get_tokenizer_dir


def text_iterator(max_chars, doc_cap):
    """Train documents, each cut to doc_cap chars (so one giant document cannot dominate the pair
    counts), until max_chars in total."""
    seen = 0
    for batch in parquets_iter_batched("train"):
        for doc in batch:
            doc = doc[:doc_cap]
            seen += len(doc)
            yield doc
            if seen >= max_chars:
                return


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the train shards (rustbpe) "
                                     "and save it to $NANOCHAT_BASE_DIR/tokenizer.")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many chars")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many chars per document")
    parser.add_argument("--vocab-size", type=int, default=65536,
                        help=f"vocabulary size including the {len(SPECIAL_TOKENS)} special tokens")
    args = parser.parse_args(argv)
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise UserError("--max-chars and --doc-cap must be positive")
    print(f"training a {args.vocab_size}-token tokenizer on up to {args.max_chars:,} chars from {get_data_dir()}")

    chars = 0

    def counted(it):
        nonlocal chars
        for doc in it:
            chars += len(doc)
            yield doc

    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(counted(text_iterator(args.max_chars, args.doc_cap)), args.vocab_size)
    train_time = time.time() - t0
    vocab = tokenizer.get_vocab_size()
    print(f"trained on {chars:,} chars in {train_time:.2f}s; vocab size {vocab}")
    if vocab < args.vocab_size:
        print(f"warning: the text supports only {vocab} tokens (asked for {args.vocab_size}): too little data")
    tokenizer_dir = get_tokenizer_dir()
    tokenizer.save(tokenizer_dir)
    print(f"saved tokenizer and token_bytes.pt to {tokenizer_dir}")

    # sanity check: byte-exact round trip through the saved files
    loaded = Tokenizer.from_directory(tokenizer_dir)
    sample = "Hello world! 123 naïve café 日本語 🙂\n\tdef f(x): return x"
    if loaded.decode(loaded.encode(sample)) != sample:
        raise RuntimeError("tokenizer round trip failed on the sanity sample")

    token_bytes = compute_token_bytes(loaded)
    ordinary = token_bytes[token_bytes > 0].float()
    stats = {"train_time_s": round(train_time, 2), "train_chars": chars, "vocab_size": vocab,
             "num_special_tokens": len(SPECIAL_TOKENS), "token_bytes_min": int(ordinary.min()),
             "token_bytes_max": int(ordinary.max()), "token_bytes_mean": round(ordinary.mean().item(), 3),
             "token_bytes_std": round(ordinary.std().item(), 3)}
    print(", ".join(f"{k}={v}" for k, v in stats.items()))
    from nanochat.report import get_report
    get_report().log(section="Tokenizer training", data=[vars(args), stats])


if __name__ == "__main__":
    run_main(main)
