"""Level files: format, two-phase append, corrupt/foreign files, and kill -9 crash safety of the disk tree."""
import json
import os
import random
import signal
import struct
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet
from megacontext.storage import (COUNT_OFFSET, HEADER_SIZE, MAGIC, DiskLevel, RamLevel, TreeError, read_meta,
                                 write_meta)
from megacontext.tree import MCTree

D, V, K = 16, 50, 32


def test_header_layout_and_roundtrip(tmp_path):
    p = str(tmp_path / "L2.ctx")
    s = DiskLevel.create(p, 2, K, D, "float16")
    rows = torch.randn(5, D).half()
    s.write(rows)
    s.commit()
    s.close()
    raw = open(p, "rb").read()
    assert raw[:8] == MAGIC and len(raw) == HEADER_SIZE + 5 * D * 2
    assert struct.unpack_from("<IIIII", raw, 8) == (1, 2, K, D, 2)  # version, level, K, dim, dtype code
    assert struct.unpack_from("<Q", raw, COUNT_OFFSET)[0] == 5
    assert np.array_equal(np.frombuffer(raw[HEADER_SIZE:], np.float16).reshape(5, D), rows.numpy())
    s = DiskLevel.open(p, 2)
    assert torch.equal(s.read(1, 4), rows[1:4])
    s.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_disk_and_ram_levels_agree(tmp_path, dtype):
    tdt = torch.float16 if dtype == "float16" else torch.bfloat16
    disk = DiskLevel.create(str(tmp_path / "L1.ctx"), 1, K, D, dtype)
    ram = RamLevel(1, D, dtype)
    data = torch.randn(300, D).to(tdt)
    for a, b in [(0, 1), (1, 70), (70, 300)]:
        for s in (disk, ram):
            s.write(data[a:b])
            s.commit()
            assert torch.equal(s.read(0, b), data[:b])  # reads see each commit (the mmap follows the file)
    tok_d = DiskLevel.create(str(tmp_path / "L0.ctx"), 0, K, 1, "uint32")
    tok_r = RamLevel(0, 1, "uint32")
    ids = torch.tensor([0, 7, 2 ** 31 - 1], dtype=torch.int32)
    for s in (tok_d, tok_r):
        s.write(ids)
        s.commit()
        assert s.read(0, 3).long().tolist() == [0, 7, 2 ** 31 - 1]


def test_staged_rows_invisible_until_commit_and_discarded_on_open(tmp_path):
    p = str(tmp_path / "L1.ctx")
    s = DiskLevel.create(p, 1, K, D, "float16")
    s.write(torch.ones(3, D).half())
    s.commit()
    s.write(torch.zeros(4, D).half())  # payload on disk, count not advanced: a crash right here
    assert os.path.getsize(p) == HEADER_SIZE + 7 * D * 2
    os.close(s._fd)  # die without close() (which would truncate)
    s = DiskLevel.open(p, 1)
    assert s.count == 3 and os.path.getsize(p) == HEADER_SIZE + 3 * D * 2  # uncommitted bytes dropped
    assert torch.equal(s.read(0, 3), torch.ones(3, D).half())
    s.close()


def test_wrong_rows_rejected(tmp_path):
    s = DiskLevel.create(str(tmp_path / "L1.ctx"), 1, K, D, "float16")
    with pytest.raises(TreeError, match=rf"gist rows for level 1 must have shape \(n, {D}\), got \(2, {D + 1}\)"):
        s.write(torch.zeros(2, D + 1).half())
    with pytest.raises(TreeError, match="must be torch.float16"):
        s.write(torch.zeros(2, D))
    with pytest.raises(TreeError, match="level 1 must have shape"):
        RamLevel(1, D, "float16").write(torch.zeros(2, 3).half())
    with pytest.raises(TreeError, match="1-D tensor of token ids"):
        RamLevel(0, 1, "uint32").write(torch.zeros(2, 1, dtype=torch.int32))
    s.close()


def _corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_and_foreign_level_files(tmp_path):
    def fresh(name="L1.ctx", level=1, n=4):
        p = str(tmp_path / name)
        if os.path.exists(p):
            os.remove(p)
        s = DiskLevel.create(p, level, K, D, "float16")
        s.write(torch.zeros(n, D).half())
        s.commit()
        s.close()
        return p
    p = fresh()
    _corrupt(p, 0, b"PK\x03\x04xxxx")
    with pytest.raises(TreeError, match=r"L1\.ctx: not a MegaContext level file \(bad magic"):
        DiskLevel.open(p, 1)
    p = fresh()
    os.truncate(p, 20)
    with pytest.raises(TreeError, match=r"L1\.ctx: truncated header \(20 of 64 bytes\)"):
        DiskLevel.open(p, 1)
    p = fresh()
    os.truncate(p, HEADER_SIZE + 3 * D * 2 + 1)
    with pytest.raises(TreeError, match="corrupt, header commits 4 rows"):
        DiskLevel.open(p, 1)
    p = fresh()
    with pytest.raises(TreeError, match="header says level 1, expected level 2"):
        DiskLevel.open(p, 2)
    p = fresh()
    _corrupt(p, 8, struct.pack("<I", 99))
    with pytest.raises(TreeError, match="unsupported format version 99"):
        DiskLevel.open(p, 1)
    p = fresh()
    _corrupt(p, 24, struct.pack("<I", 7))
    with pytest.raises(TreeError, match="unknown dtype code 7"):
        DiskLevel.open(p, 1)
    with pytest.raises(TreeError, match="missing level file"):
        DiskLevel.open(str(tmp_path / "L9.ctx"), 9)


def test_meta_errors(tmp_path):
    d = str(tmp_path)
    with pytest.raises(TreeError, match="meta.json: missing"):
        read_meta(d)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(TreeError, match="meta.json: corrupt JSON"):
        read_meta(d)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TreeError, match="not a MegaContext tree meta file"):
        read_meta(d)
    write_meta(d, {"dim": 4})
    with pytest.raises(TreeError, match="missing field 'mc_config'"):
        read_meta(d)


def _parts(seed=0):
    cfg = MCConfig(max_level=2, gist_layers=1)
    torch.manual_seed(seed)
    net = GistNet(D, cfg, n_head=2)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return cfg, net, nn.Embedding(V, D)


def test_tree_header_mismatch_with_meta(tmp_path):
    cfg, net, wte = _parts()
    d = str(tmp_path / "t")
    MCTree.create(d, cfg, net, wte).close()
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta["mc_config"]["storage_dtype"] = "bfloat16"
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    with pytest.raises(TreeError, match=r"L1\.ctx: header .*float16.* disagrees with meta.json .*bfloat16"):
        MCTree.open(d, net, wte)


def test_interrupted_commit_leaves_previous_state(tmp_path, monkeypatch):
    """Kill between the top-down commits (higher levels committed, L0 not): reopen = state before the append."""
    cfg, net, wte = _parts()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, V, 3000))
    d = str(tmp_path / "t")
    tree = MCTree.create(d, cfg, net, wte)
    tree.append(ids[:1000])
    before = [tree.level_counts(), tree.gists(1, 0, tree.count(1))]
    real_commit = DiskLevel.commit

    def dying_commit(self):
        if self.level == 0:
            raise KeyboardInterrupt("simulated kill before the L0 commit")
        real_commit(self)
    monkeypatch.setattr(DiskLevel, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        tree.append(ids[1000:2100])
    monkeypatch.setattr(DiskLevel, "commit", real_commit)
    assert tree._stores[1].count > 1000 // K  # level 1 did commit on disk
    for s in tree._stores:  # vanish without any cleanup
        os.close(s._fd)
    tree = MCTree.open(d, net, wte)
    assert tree.level_counts() == before[0]
    assert torch.equal(tree.gists(1, 0, tree.count(1)), before[1])
    tree.append(ids[1000:])
    ref = MCTree.ram(cfg, net, wte)
    ref.append(ids[:1000])
    ref.append(ids[1000:])
    assert tree.level_counts() == ref.level_counts()
    for L in (1, 2):
        assert torch.equal(tree.gists(L, 0, tree.count(L)), ref.gists(L, 0, ref.count(L)))


# ----------------------------------------------------------------------------------------------
# kill -9 at random moments. The child is forked (torch already imported: ~ms, not seconds), keeps
# appending the same deterministic stream from wherever the tree stands, and reports every count
# it saw committed on a pipe. After SIGKILL, a reopen must succeed and hold a prefix of the stream
# at least as long as the last reported commit, with consistent levels and correct gists.

STREAM = np.random.default_rng(123).integers(0, V, 400_000)


def _slow_disk():
    """In the child only: a slow disk, so random kills often land inside a payload write or before a commit."""
    real_write, real_commit = DiskLevel.write, DiskLevel.commit

    def write(self, rows):
        h = rows.size(0) // 2
        if h:
            real_write(self, rows[:h])
            time.sleep(0.002)
        real_write(self, rows[h:])

    def commit(self):
        time.sleep(0.001)
        real_commit(self)
    DiskLevel.write, DiskLevel.commit = write, commit


def _dirty(d):
    """Does any level file hold bytes past its committed count (an append was cut short)?"""
    for L in range(3):
        p = os.path.join(d, f"L{L}.ctx")
        with open(p, "rb") as f:
            n = struct.unpack_from("<Q", f.read(HEADER_SIZE), COUNT_OFFSET)[0]
        if os.path.getsize(p) > HEADER_SIZE + n * (4 if L == 0 else 2 * D):
            return True
    return False


def _child(d, wfd, seed):
    try:
        torch.set_num_threads(1)  # no OpenMP pool inherited across fork
        _slow_disk()
        cfg, net, wte = _parts()
        tree = MCTree.open(d, net, wte)
        rng = random.Random(seed)
        while tree.num_tokens < len(STREAM):
            n = tree.num_tokens
            tree.append(STREAM[n:n + rng.choice([1, 5, 31, 32, 33, 200, 1024, 1500])])
            os.write(wfd, f"{tree.num_tokens}\n".encode())
        time.sleep(60)
    finally:
        os._exit(0)


def _kill_cycles(tmp_path, n_kills, seed):
    cfg, net, wte = _parts()
    d = str(tmp_path / "t")
    MCTree.create(d, cfg, net, wte).close()
    rng = random.Random(seed)
    cut_short = 0
    for k in range(n_kills):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(d, w, seed * 1000 + k)
        os.close(w)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        reports = os.read(r, 1 << 20).decode().split()
        os.close(r)
        last = int(reports[-1]) if reports else 0
        cut_short += _dirty(d)
        tree = MCTree.open(d, net, wte)
        N = tree.num_tokens
        assert N >= last, f"kill {k}: committed {last} tokens, reopen holds {N}"  # nothing committed lost
        assert np.array_equal(tree.tokens(0, N).numpy(), STREAM[:N]), f"kill {k}: not a prefix of the stream"
        assert tree.level_counts() == [N, N // K, N // K ** 2]
        for L in (1, 2):  # the newest gists equal GistNet of their children
            c = tree.count(L)
            for i in range(max(0, c - 2), c):
                with torch.no_grad():
                    kids = wte(tree.tokens(i * K, i * K + K)) if L == 1 else tree.gists(1, i * K, i * K + K)
                    want = net(kids[None], L)[0].half().float()
                torch.testing.assert_close(tree.gists(L, i, i + 1)[0], want, rtol=2e-3, atol=2e-3)
        tree.close()
    return N, cut_short


def test_crash_safety_sigkill_20(tmp_path):
    N, cut_short = _kill_cycles(tmp_path, 20, seed=1)
    assert N > 10 * K and cut_short >= 1  # the stream grew, and kills did land mid-append


@pytest.mark.slow
def test_crash_safety_sigkill_100(tmp_path):
    N, cut_short = _kill_cycles(tmp_path, 100, seed=2)
    assert N > 10 * K and cut_short >= 5
