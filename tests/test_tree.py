"""MCTree: counts and gists under any chunking (hypothesis), RAM == disk, reopen, stale/regist, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet, gistnet_fingerprint
from megacontext.storage import TreeError
from megacontext.tree import MCTree, StaleTreeError, main as tree_main
from nanochat.gpt import GPT, GPTConfig

D, V, K = 32, 97, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_parts(seed=0, max_level=3, storage_dtype="float16"):
    """Tiny config, a GistNet with every weight random (so a gist is not just a mean), a wte."""
    cfg = MCConfig(max_level=max_level, gist_layers=1, storage_dtype=storage_dtype)
    torch.manual_seed(seed)
    net = GistNet(D, cfg, n_head=2)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return cfg, net, nn.Embedding(V, D)


def stream(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, size=n))


def reference_gist(tree, net, wte, L, i):
    """GistNet applied to exactly the K children node (L, i) claims, recomputed outside the tree."""
    with torch.no_grad():
        if L == 1:
            children = wte(tree.tokens(i * K, (i + 1) * K))
        else:
            children = tree.gists(L - 1, i * K, (i + 1) * K)
        return net(children[None], L)[0].to(torch.float16).float()


def assert_tree_consistent(tree, net, wte, ids):
    N = len(ids)
    assert tree.num_tokens == N
    assert [tree.count(L) for L in range(tree.max_level + 2)] == [N // K ** L for L in range(tree.max_level + 1)] + [0]
    assert N - tree.count(1) * K == N % K  # the raw tail
    assert torch.equal(tree.tokens(0, N), ids)
    for L in range(1, tree.max_level + 1):
        for i in range(tree.count(L)):
            # fp16 storage: equal up to rounding of values computed in another batch shape
            torch.testing.assert_close(tree.gists(L, i, i + 1)[0], reference_gist(tree, net, wte, L, i),
                                       rtol=2e-3, atol=2e-3)


def chunks_of(ids, sizes):
    pos = 0
    for s in sizes:
        if pos >= len(ids):
            break
        yield ids[pos:pos + s]
        pos += s
    if pos < len(ids):
        yield ids[pos:]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 2200), sizes=st.lists(st.integers(1, 700), min_size=1, max_size=12))
def test_property_counts_tail_and_gists_any_chunking(n, sizes):
    cfg, net, wte = make_parts(max_level=2)
    ids = stream(n, seed=n)
    tree = MCTree.ram(cfg, net, wte)
    calls = []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(i[1]))
    for chunk in chunks_of(ids, sizes):
        before = tree.level_counts()
        calls.clear()
        assert tree.append(chunk) == len(chunk)
        grown = [L for L in (1, 2) if tree.count(L) > before[L]]
        assert calls == grown  # one batched GistNet call per level that completed groups
    hook.remove()
    assert_tree_consistent(tree, net, wte, ids)


@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16"])
def test_ram_and_disk_identical_and_reach_level3(tmp_path, storage_dtype):
    cfg, net, wte = make_parts(storage_dtype=storage_dtype)
    ids = stream(K ** 3 + 5 * K + 3)
    ram = MCTree.ram(cfg, net, wte)
    disk = MCTree.create(str(tmp_path / "t"), cfg, net, wte, model_id="m")
    for chunk in chunks_of(ids, [1, 31, 1000, 3, 20000]):
        ram.append(chunk)
        disk.append(chunk)
    assert ram.level_counts() == disk.level_counts() == [len(ids), K * K + 5, K, 1]
    assert torch.equal(ram.tokens(0, len(ids)), disk.tokens(0, len(ids)))
    for L in (1, 2, 3):
        assert torch.equal(ram.gists(L, 0, ram.count(L)), disk.gists(L, 0, disk.count(L)))
    if storage_dtype == "float16":  # one chunking vs another: same tree (up to fp16 rounding)
        one = MCTree.ram(cfg, net, wte)
        one.append(ids)
        torch.testing.assert_close(one.gists(3, 0, 1), ram.gists(3, 0, 1), rtol=2e-3, atol=2e-3)
        assert_tree_consistent(ram, net, wte, ids)
    disk.close()
    bytes_per_token = disk.disk_bytes() / len(ids)
    assert bytes_per_token == pytest.approx(4 + 2 * D * (1 / K + 1 / K ** 2 + 1 / K ** 3), rel=0.01)


def test_disk_tree_reopened_in_new_process_identical(tmp_path):
    cfg, net, wte = make_parts()
    ids = stream(3000)
    tree = MCTree.create(str(tmp_path / "t"), cfg, net, wte, model_id="gpt-abc")
    tree.append(ids[:1111])
    tree.append(ids[1111:])
    expected = {"tokens": tree.tokens(0, 3000), **{f"L{L}": tree.gists(L, 0, tree.count(L)) for L in (1, 2)}}
    tree.close()
    torch.save({"gistnet": net.state_dict(), "wte": wte.weight.detach()}, tmp_path / "ck.pt")
    code = (
        "import sys, torch\n"
        "from megacontext.storage import read_meta\n"
        "from megacontext.tree import MCTree, load_gist_checkpoint\n"
        "d, ck, out = sys.argv[1:]\n"
        "net, wte, _ = load_gist_checkpoint(ck, read_meta(d))\n"
        "t = MCTree.open(d, net, wte, model_id='gpt-abc')\n"
        "assert not t.stale, t.stale_reason\n"
        "torch.save({'tokens': t.tokens(0, t.num_tokens), 'L1': t.gists(1, 0, t.count(1)),"
        " 'L2': t.gists(2, 0, t.count(2))}, out)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "t"), str(tmp_path / "ck.pt"), str(tmp_path / "o.pt")],
                   check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    got = torch.load(tmp_path / "o.pt")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_reopen_and_continue_equals_uninterrupted(tmp_path):
    cfg, net, wte = make_parts()
    ids = stream(2500)
    ram = MCTree.ram(cfg, net, wte)
    ram.append(ids[:700])
    ram.append(ids[700:])
    d = str(tmp_path / "t")
    with MCTree.create(d, cfg, net, wte) as t:
        t.append(ids[:700])
    with MCTree.open(d, net, wte) as t:
        assert t.num_tokens == 700
        t.append(ids[700:])
        for L in (1, 2):
            assert torch.equal(t.gists(L, 0, t.count(L)), ram.gists(L, 0, ram.count(L)))
    meta = json.load(open(os.path.join(d, "meta.json")))
    assert meta["counts"] == [2500, 78, 2, 0] and meta["gistnet"] == gistnet_fingerprint(net)


def test_embed_can_be_a_gpt_or_callable():
    cfg, net, _ = make_parts()
    gpt = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=D))
    gpt.init_weights()
    ids = stream(100)
    a = MCTree.ram(cfg, net, gpt)
    assert a.vocab_size == V
    b = MCTree.ram(cfg, net, lambda x: gpt.transformer.wte(x), vocab_size=V)
    a.append(ids)
    b.append(ids.tolist())
    assert torch.equal(a.gists(1, 0, 3), b.gists(1, 0, 3))
    with pytest.raises(ValueError, match="vocab_size"):
        MCTree.ram(cfg, net, lambda x: x)


def test_bad_ids_raise_clear_errors():
    cfg, net, wte = make_parts()
    tree = MCTree.ram(cfg, net, wte)
    with pytest.raises(TreeError, match="must be integers.*float"):
        tree.append(torch.tensor([1.0, 2.0]))
    with pytest.raises(TreeError, match="must be integers"):
        tree.append([1, 2.5])
    with pytest.raises(TreeError, match="must be integers"):
        tree.append(["a", "b"])
    with pytest.raises(TreeError, match="must be integers"):
        tree.append(torch.tensor([True]))
    with pytest.raises(TreeError, match=rf"token id {V} at position 2 is outside the vocabulary \[0, {V}\)"):
        tree.append([0, 1, V])
    with pytest.raises(TreeError, match="token id -1 at position 0"):
        tree.append(np.array([-1, 3]))
    with pytest.raises(TreeError, match="1-D"):
        tree.append(torch.zeros(2, 3, dtype=torch.long))
    assert tree.num_tokens == 0  # nothing half-appended
    assert tree.append([]) == 0 and tree.append(np.array([5], dtype=np.uint8)) == 1
    with pytest.raises(IndexError, match="out of bounds"):
        tree.tokens(0, 2)
    with pytest.raises(ValueError, match="levels >= 1"):
        tree.gists(0, 0, 0)


def test_stale_tree_and_regist(tmp_path):
    cfg, net, wte = make_parts()
    ids = stream(1200)
    d = str(tmp_path / "t")
    with MCTree.create(d, cfg, net, wte, model_id="m1") as t:
        t.append(ids)
    _, net2, _ = make_parts(seed=1)
    t = MCTree.open(d, net2, wte, model_id="m1")
    assert t.stale and "GistNet" in t.stale_reason
    assert torch.equal(t.tokens(0, 10), ids[:10])  # tokens stay readable
    with pytest.raises(StaleTreeError, match="stale.*regist"):
        t.gists(1, 0, 1)
    with pytest.raises(StaleTreeError, match="cannot append"):
        t.append([1])
    t.close()
    # a different model identity is stale too
    t = MCTree.open(d, net, wte, model_id="m2")
    assert t.stale and "'m1'" in t.stale_reason and "'m2'" in t.stale_reason
    t.close()
    t = MCTree.open(d, net2, wte, model_id="m1")
    t.regist()
    assert not t.stale
    assert_tree_consistent(t, net2, wte, ids)
    t.close()
    t = MCTree.open(d, net2, wte, model_id="m1")
    assert not t.stale
    t.close()
    # the old GistNet is now the stale one
    assert MCTree.open(d, net, wte).stale


def test_regist_cli(tmp_path, capsys):
    cfg, net, wte = make_parts()
    ids = stream(1100)
    d = str(tmp_path / "t")
    with MCTree.create(d, cfg, net, wte, model_id="m") as t:
        t.append(ids)
    _, net2, _ = make_parts(seed=2)
    torch.save({"gistnet": net2.state_dict(), "model": {"transformer.wte.weight": wte.weight.detach()}},
               tmp_path / "ck.pt")
    tree_main(["regist", d, "--checkpoint", str(tmp_path / "ck.pt")])
    tree_main(["info", d])
    assert "1100 tokens" in capsys.readouterr().out
    t = MCTree.open(d, net2, wte, model_id="m")
    assert not t.stale
    assert_tree_consistent(t, net2, wte, ids)
    # the CLI prints user errors as one line (exit 2)
    r = subprocess.run([sys.executable, "-m", "megacontext.tree", "regist", str(tmp_path / "nope"),
                        "--checkpoint", "x.pt"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "no such tree directory" in r.stderr \
        and "Traceback" not in r.stderr


def test_open_errors(tmp_path):
    cfg, net, wte = make_parts()
    d = str(tmp_path / "t")
    with MCTree.create(d, cfg, net, wte) as t:
        t.append(stream(100))
    with pytest.raises(TreeError, match="already exists"):
        MCTree.create(d, cfg, net, wte)
    with pytest.raises(TreeError, match="max_level=3.*2"):
        MCTree.open(d, net, wte, cfg=MCConfig(max_level=2))
    wide = GistNet(2 * D, cfg, n_head=2)
    with pytest.raises(TreeError, match="32-dim gists.*64-dim"):
        MCTree.open(d, wide, nn.Embedding(V, 2 * D))
    with pytest.raises(TreeError, match="not a MegaContext tree"):
        MCTree.open(str(tmp_path), net, wte)
    # open_or_create opens the existing tree
    with MCTree.open_or_create(d, cfg, net, wte) as t:
        assert t.num_tokens == 100
    with MCTree.open_or_create(str(tmp_path / "new"), cfg, net, wte) as t:
        assert t.num_tokens == 0
    # a callable embedding takes the vocabulary size recorded in meta.json
    with MCTree.open(d, net, lambda x: wte(x)) as t:
        assert t.vocab_size == V
        with pytest.raises(TreeError, match="outside the vocabulary"):
            t.append([V])
        assert t.count(4) == 0 and t.gists(4, 0, 0).shape == (0, D)  # above max_level: empty
