"""Midtraining: exact packing of rendered conversations, loss falls, checkpoint round trip, offline errors."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.common import UserError
from tasks.common import Task
from tasks.arithmetic import Arithmetic
from test_tasks import offline_hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_base_checkpoint(base_dir, tag="d1", seq_len=64, extra=None, seed=0):
    """A tiny random-init base GPT (depth 1, width 32) saved through the checkpoint manager."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.tokenizer import get_tokenizer
    torch.manual_seed(seed)
    cfg = config_from_depth(1, get_tokenizer().get_vocab_size(), seq_len, aspect_ratio=32, head_dim=16)
    model = GPT(cfg)
    model.init_weights()
    data = {"gpt": model.state_dict(), **(extra or {})}
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", tag), 0, data, None,
                    {"model_config": model.config_dict(), "step": 0, "val_bpb": None})
    return model


class Convs(Task):
    def __init__(self, convs):
        super().__init__()
        self.convs = convs

    def num_examples(self):
        return len(self.convs)

    def get_example(self, i):
        return self.convs[i]


def test_packed_batches_exact_stream(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    from scripts.mid_train import packed_batches
    tok = get_tokenizer()
    task = Arithmetic("train", size=40)
    B, T = 2, 16
    # the reference stream: every conversation rendered, concatenated, forever
    stream, smask = [], []
    while len(stream) < 5 * B * T + 1:
        for conv in task:
            ids, mask = tok.render_conversation(conv, max_tokens=10**9)
            stream += ids
            smask += mask
    gen = packed_batches(task, tok, B, T)
    mgen = packed_batches(task, tok, B, T, masked=True)
    for k in range(5):
        x, y, _ = next(gen)
        xm, ym, _ = next(mgen)
        s = k * B * T
        assert x.flatten().tolist() == stream[s:s + B * T]
        assert y.flatten().tolist() == stream[s + 1:s + B * T + 1]        # next token, no pair dropped
        assert torch.equal(xm, x)
        ref = [t if m else -1 for t, m in zip(stream[s + 1:s + B * T + 1], smask[s + 1:s + B * T + 1])]
        assert ym.flatten().tolist() == ref
    bos = tok.get_bos_token_id()
    assert stream.count(bos) >= 2 and stream[0] == bos  # BOS-separated conversations


def test_packed_batches_ranks_disjoint_and_progress(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    from scripts.mid_train import packed_batches
    tok = get_tokenizer()
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(8)]
    task = Convs(convs)
    seen = {}
    for rank in (0, 1):
        gen = packed_batches(task, tok, 1, 40, rank=rank, world_size=2)
        x, y, progress = next(gen)
        text = tok.decode(x[0].tolist() + [y[0, -1].item()])
        seen[rank] = set(re.findall(r"q(\d)", text))
        assert 0 < progress <= 1.5
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] <= {"0", "2", "4", "6"} and seen[1] <= {"1", "3", "5", "7"}
    with pytest.raises(UserError):
        next(packed_batches(Convs(convs[:1]), tok, 1, 8, rank=0, world_size=2))


def _run_mid(capsys, *extra):
    from scripts import mid_train
    mid_train.main(["--mixture", "offline", "--device-type", "cpu", "--device-batch-size", "4",
                    "--max-seq-len", "64", "--total-batch-size", "-1", "--eval-tokens", "1024", *extra])
    return capsys.readouterr().out


def test_mid_train_loss_falls_and_checkpoint_loads(tiny_base_env, capsys):
    from nanochat.checkpoint_manager import load_model
    gist_sd = {"w": torch.arange(6.0).view(2, 3)}  # a stand-in for a MegaContext net in the base checkpoint
    base = make_base_checkpoint(tiny_base_env, extra={"gistnet": gist_sd})
    out = _run_mid(capsys, "--num-iterations", "30", "--eval-every", "30")
    losses = [float(v) for v in re.findall(r"\| loss: ([0-9.]+)", out)]
    bpbs = [float(v) for v in re.findall(r"step \d+ \| val bpb: ([0-9.]+)", out)]
    assert len(losses) == 30 and len(bpbs) == 2
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses      # training loss falls
    assert bpbs[1] < 0.8 * bpbs[0], bpbs                         # and so does val bpb
    model, tok, meta = load_model("mid", "cpu", phase="eval")
    assert meta["step"] == 30 and meta["source"]["stage"] == "base" and meta["model_config"] == base.config_dict()
    assert meta["val_bpb"] == pytest.approx(bpbs[-1], abs=1e-4)
    assert torch.equal(meta["model_data"]["gistnet"]["w"], gist_sd["w"])  # other nets carried over unchanged
    changed = [not torch.equal(p, q) for p, q in zip(model.state_dict().values(), base.state_dict().values())]
    assert all(changed)
    report = os.path.join(tiny_base_env, "report", "midtraining.md")
    assert os.path.exists(report) and "Final validation bpb" in open(report).read()


def test_mid_train_masked_loss_runs(tiny_base_env, capsys):
    make_base_checkpoint(tiny_base_env)
    out = _run_mid(capsys, "--num-iterations", "3", "--eval-every", "0", "--masked-loss", "1")
    assert "loss on assistant tokens" in out and "saved" in out


def test_mid_train_text_share_replays_pretraining_text(tiny_base_env, capsys):
    """--text-share 1: every micro-batch is the pretraining train stream (the first step's loss is the base
    model's loss on the stream's first batch), the pretraining-text val bpb falls, and the report counts the rows."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.tokenizer import get_tokenizer
    base = make_base_checkpoint(tiny_base_env)
    # a fresh lm_head is ~0, so every batch would score ln V: give it weights that tell batches apart
    with torch.no_grad():
        base.lm_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_checkpoint(os.path.join(tiny_base_env, "base_checkpoints", "d1"), 0, {"gpt": base.state_dict()}, None,
                    {"model_config": base.config_dict(), "step": 0, "val_bpb": None})
    x, y, _ = next(tokenizing_distributed_data_loader(get_tokenizer(), 4, 64, "train"))
    xv, yv, _ = next(tokenizing_distributed_data_loader(get_tokenizer(), 4, 64, "val"))
    with torch.no_grad():
        ref, ref_val = float(base(x, y)), float(base(xv, yv))
    assert abs(ref - ref_val) > 1e-2  # the check below can tell the train stream from another
    out = _run_mid(capsys, "--num-iterations", "20", "--eval-every", "20", "--text-share", "1")
    losses = [float(v) for v in re.findall(r"\| loss: ([0-9.]+)", out)]
    text_bpb = [float(v) for v in re.findall(r"pretraining-text val bpb: ([0-9.]+)", out)]
    assert losses[0] == pytest.approx(ref, abs=2e-4)
    assert len(text_bpb) == 2 and text_bpb[1] < 0.8 * text_bpb[0], text_bpb
    report = open(os.path.join(tiny_base_env, "report", "midtraining.md")).read()
    assert re.search(r"Pretraining-text rows \(--text-share\): 80\b", report), report


def test_mid_train_errors(tiny_base_env, monkeypatch, tmp_path):
    from scripts import mid_train
    with pytest.raises(UserError, match="no base checkpoints"):
        mid_train.main(["--mixture", "offline", "--device-type", "cpu"])
    make_base_checkpoint(tiny_base_env)
    offline_hub(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1.*offline tasks are"):
        mid_train.main(["--mixture", "full", "--device-type", "cpu", "--max-seq-len", "64",
                        "--device-batch-size", "2", "--total-batch-size", "-1"])
    with pytest.raises(UserError, match="multiple of"):
        mid_train.main(["--mixture", "offline", "--device-type", "cpu", "--max-seq-len", "64",
                        "--device-batch-size", "2", "--total-batch-size", "100"])
    with pytest.raises(UserError, match="--text-share must be in"):
        mid_train.main(["--mixture", "offline", "--device-type", "cpu", "--max-seq-len", "64",
                        "--device-batch-size", "2", "--total-batch-size", "-1", "--text-share", "1.5"])
    shutil.rmtree(os.path.join(tiny_base_env, "base_data"))
    with pytest.raises(UserError, match="no data shards.*nanochat.dataset"):
        mid_train.main(["--mixture", "offline", "--device-type", "cpu", "--max-seq-len", "64",
                        "--device-batch-size", "2", "--total-batch-size", "-1", "--text-share", "0.5"])


def test_build_mixture_offline_deterministic():
    from scripts.mid_train import build_mixture
    a, b = build_mixture("offline", "train"), build_mixture("offline", "train")
    assert len(a) == 26000 and [a[i] for i in range(0, 26000, 997)] == [b[i] for i in range(0, 26000, 997)]
    v = build_mixture("offline", "val")
    assert 0 < len(v) < len(a) and v[0] != a[0]


@pytest.mark.slow
def test_mid_train_ddp_two_ranks(tiny_base_env):
    """torchrun with 2 CPU ranks (gloo): trains, averages grads with sync_grads, writes one checkpoint."""
    make_base_checkpoint(tiny_base_env)
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=tiny_base_env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.mid_train", "--mixture", "offline", "--device-type", "cpu", "--device-batch-size", "2",
           "--max-seq-len", "32", "--total-batch-size", "-1", "--num-iterations", "3", "--eval-every", "0",
           "--eval-tokens", "256"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "tokens per step: 128 = 2 x 32 x 2 ranks" in r.stdout
    assert os.path.exists(os.path.join(tiny_base_env, "mid_checkpoints", "d1", "model_000003.pt"))
    assert os.path.exists(os.path.join(tiny_base_env, "mid_checkpoints", "d1", "optim_000003_rank1.pt"))
