"""
--mc through the training scripts: base_train writes GistNet + LensNet + mc_config that MCSession.load
accepts and `--resume` continues exactly (MC optimizer state included); mid_train / chat_sft refuse a
source without MegaContext in one line, carry the nets from an MC source (trained with --mc,
unchanged without), reject conflicting architecture flags; random tokens keep the LM losses >= ln V;
the long-context mixture's rows label exactly the answer; torchrun with 2 gloo ranks keeps every
MegaContext parameter identical (slow).
"""
import math
import os
import re

import numpy as np
import pytest
import torch

from nanochat.common import UserError
from test_base_train import assert_one_line_error, run_script
from test_mid_train import make_base_checkpoint

MC = ["--mc", "--mc-budget=64", "--mc-tail-tokens=32", "--mc-train-min-target=32", "--mc-max-level=2",
      "--mc-gist-layers=1", "--mc-lens-dim=32", "--mc-lens-heads=2", "--mc-lens-layers=1"]
TINY = ["--depth=1", "--aspect-ratio=32", "--head-dim=16", "--max-seq-len=192", "--device-batch-size=2",
        "--total-batch-size=-1", "--sample-every=-1", "--eval-tokens=768", "--eval-every=0"]
MID = ["--mixture=offline", "--max-seq-len=192", "--device-batch-size=2", "--total-batch-size=-1",
       "--eval-every=0", "--eval-tokens=768"]
SFT = ["--mixture=offline", "--max-seq-len=192", "--device-batch-size=2", "--target-examples-per-step=2",
       "--eval-every=0", "--eval-steps=1", "--eval-metrics-every=-1"]


def load(base, stage, tag, step):
    from nanochat.checkpoint_manager import load_checkpoint
    return load_checkpoint(os.path.join(base, stage, tag), step, torch.device("cpu"), load_optimizer=True)


def assert_all_changed(a, b, names=("gistnet", "lensnet")):
    for n in names:
        same = [k for k in a[n] if torch.equal(a[n][k], b[n][k])]
        assert not same, f"{n} tensors unchanged by training: {same}"


def base_mc(argv):
    from scripts import base_train
    base_train.main(TINY + MC + argv)


@pytest.fixture
def mc_base(tiny_base_env):
    """A base checkpoint trained 3 steps with --mc (tag d1, checkpoints at steps 2 and 3)."""
    base_mc(["--num-iterations=3", "--save-every=2", "--mc-train-plain-lm=0"])
    return tiny_base_env


def test_base_train_mc_checkpoint_session_and_resume(mc_base):
    from megacontext.runtime import MCSession
    m2, o2, meta2 = load(mc_base, "base_checkpoints", "d1", 2)
    m3, o3, meta3 = load(mc_base, "base_checkpoints", "d1", 3)
    assert {"gpt", "gistnet", "lensnet"} <= set(m3)
    assert meta3["mc_config"]["budget"] == 64 and meta3["mc_config"]["lens_dim"] == 32
    # one optimizer step (plain-LM share 0: every step trains GistNet and LensNet) changes every tensor
    assert_all_changed(m2, m3)
    # the MC nets' AdamW state is in the optimizer checkpoint: one state per MC parameter
    n_mc = sum(v.numel() > 0 for n in ("gistnet", "lensnet") for v in m3[n].values())
    adam_states = o3[0]["state"]
    assert len(adam_states) >= n_mc + 2, len(adam_states)
    s = MCSession.load(source="base", device="cpu")
    assert s.cfg.budget == 64 and s.cfg.lens_dim == 32
    for n, net in (("gistnet", s.gistnet), ("lensnet", s.lensnet)):
        for k, v in net.state_dict().items():
            assert torch.equal(v, m3[n][k].float()), (n, k)
    # --resume from step 2 reproduces step 3 exactly, MC nets included
    base_mc(["--num-iterations=3", "--save-every=2", "--mc-train-plain-lm=0", "--resume=2"])
    r3, _, rmeta = load(mc_base, "base_checkpoints", "d1", 3)
    for n in ("gpt", "gistnet", "lensnet"):
        for k in m3[n]:
            assert torch.allclose(r3[n][k], m3[n][k], atol=1e-6), (n, k)
    assert abs(rmeta["train_loss"] - meta3["train_loss"]) < 1e-5
    # resuming without --mc, or with another MCConfig, is refused
    with pytest.raises(UserError, match="--mc"):
        from scripts import base_train
        base_train.main(TINY + ["--num-iterations=3", "--resume=2"])
    with pytest.raises(UserError, match="mc_config"):
        base_mc(["--num-iterations=3", "--resume=2", "--mc-lens-temp=2.0"])


def test_mid_train_mc_needs_mc_source(tiny_base_env):
    make_base_checkpoint(tiny_base_env, seq_len=192)
    proc = run_script("scripts.mid_train", MID + ["--num-iterations=1", "--mc"], tiny_base_env, timeout=120)
    assert_one_line_error(proc, "no MegaContext weights", "gistnet", "lensnet", "mc_config")
    from scripts import chat_sft
    with pytest.raises(UserError, match="no MegaContext weights"):
        chat_sft.main(SFT + ["--source=base", "--num-iterations=1", "--mc"])


def test_mid_and_sft_carry_mc_weights(mc_base):
    from megacontext.runtime import MCSession
    from scripts import chat_sft, mid_train
    b3, _, bmeta = load(mc_base, "base_checkpoints", "d1", 3)
    # without --mc the nets pass through unchanged
    mid_train.main(MID + ["--num-iterations=1"])
    m1, _, mmeta = load(mc_base, "mid_checkpoints", "d1", 1)
    for n in ("gistnet", "lensnet"):
        assert all(torch.equal(m1[n][k], b3[n][k]) for k in b3[n])
    assert mmeta["mc_config"] == bmeta["mc_config"]
    # an architecture flag that disagrees with the checkpoint is refused; a training knob overrides
    with pytest.raises(UserError, match="--mc-lens-dim=64"):
        mid_train.main(MID + ["--num-iterations=1", "--mc", "--mc-lens-dim=64"])
    # with --mc: long-context rows only (share 1), copy warm-up on the first of two steps
    mid_train.main(MID + ["--num-iterations=2", "--mc", "--mc-mix-share=1", "--mc-mix-warmup=0.5",
                          "--mc-mix-multiples=4", "--mc-mix-batch-size=2", "--mc-lens-weight=0.5",
                          "--mc-train-plain-lm=0"])
    m2, o2, mmeta = load(mc_base, "mid_checkpoints", "d1", 2)
    assert mmeta["mc_config"] == {**bmeta["mc_config"], "lens_weight": 0.5, "train_plain_lm": 0.0, "mix_share": 1.0,
                                  "mix_warmup": 0.5, "mix_multiples": "4", "mix_batch_size": 2}
    assert set(m2["gistnet"]) == set(b3["gistnet"]) and set(m2["lensnet"]) == set(b3["lensnet"])
    assert any(not torch.equal(m2["gistnet"][k], b3["gistnet"][k]) for k in b3["gistnet"])
    assert any(not torch.equal(m2["lensnet"][k], b3["lensnet"][k]) for k in b3["lensnet"])
    chat_sft.main(SFT + ["--num-iterations=2", "--mc"])
    s2, _, smeta = load(mc_base, "chatsft_checkpoints", "d1", 2)
    assert smeta["mc_config"] == mmeta["mc_config"]
    assert any(not torch.equal(s2["gistnet"][k], m2["gistnet"][k]) for k in m2["gistnet"])
    assert MCSession.load(source="sft", device="cpu").cfg.lens_weight == 0.5
    with open(os.path.join(mc_base, "report", "midtraining.md")) as f:
        report = f.read()
    assert "mc/loss" in report and "train/tok_per_sec" in report


def test_mid_text_share_trains_mc_nets_on_pretraining_text(mc_base):
    """--mc with --text-share 1 (no long-context rows, no warm-up): the replayed pretraining text goes
    through the MC objective, so GistNet learns from it; the report counts its rows."""
    from scripts import mid_train
    b3, _, _ = load(mc_base, "base_checkpoints", "d1", 3)
    mid_train.main(MID + ["--num-iterations=2", "--mc", "--mc-mix-share=0", "--mc-mix-warmup=0", "--text-share=1",
                          "--mc-train-plain-lm=0"])
    m2, _, _ = load(mc_base, "mid_checkpoints", "d1", 2)
    assert any(not torch.equal(m2["gistnet"][k], b3["gistnet"][k]) for k in b3["gistnet"])
    with open(os.path.join(mc_base, "report", "midtraining.md")) as f:
        report = f.read()
    assert "Pretraining-text rows (--text-share): 4" in report and "Long-context rows (mc_mixture): 0" in report


class Recorder:
    id = None  # no wandb run to resume

    def __init__(self):
        self.logs = []

    def log(self, d, **kw):
        self.logs.append(dict(d))

    def finish(self):
        pass


def test_random_tokens_keep_loss_at_log_v(tiny_base_env, monkeypatch):
    """The script path on fresh random tokens every step: no LM loss may fall below ln V - 0.05
    (a loss that learns the inputs instead of the next tokens would)."""
    from scripts import base_train
    import nanochat.dataloader as dl
    V = 512

    def random_loader(tokenizer, B, T, split, device, resume_state=None):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        while True:
            ids = torch.randint(0, V, (B, T + 1), generator=g)
            yield ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device), {}

    rec = Recorder()
    monkeypatch.setattr(dl, "tokenizing_distributed_data_loader", random_loader)
    monkeypatch.setattr(base_train, "init_wandb", lambda *a, **k: rec)
    base_train.main(TINY + MC + ["--num-iterations=12", "--log-every=1", "--embedding-lr=1.0",
                                 "--mc-train-variants=pyramid,random,lens,truncate",
                                 "--unembedding-lr=0.05", "--model-tag=rand"])
    lm = [(k, v) for d in rec.logs for k, v in d.items()
          if k.startswith("mc/loss_by_variant/") or k == "mc/plain_lm_loss"]
    assert len(lm) >= 12, rec.logs
    assert {k for k, _ in lm} >= {f"mc/loss_by_variant/{v}" for v in ("pyramid", "random", "lens", "truncate")}
    worst = min(v for _, v in lm)
    assert worst >= math.log(V) - 0.05, (worst, math.log(V))
    assert any("mc/lens_loss" in d and "mc/gist_ms" in d for d in rec.logs)


def test_mixture_rows_label_the_answer(tiny_base_env):
    from megacontext.config import MCConfig
    from nanochat.tokenizer import get_tokenizer
    from tasks.mc_mixture import TASKS, MCMixture, load_filler
    tok = get_tokenizer()
    cfg = MCConfig(budget=64, tail_tokens=32, train_min_target=32, max_level=2)
    mix = MCMixture(tok, cfg, load_filler(), multiples=(1, 4))
    rng = np.random.default_rng(0)
    K = cfg.block_size
    for task in TASKS:
        mix.tasks = (task,)
        b = mix.batch(3, rng)
        x, y, s = b.x, b.y, b.s
        assert s in (64, 256) and x.shape == y.shape and x.size(1) > s
        lab = y != -1
        assert not lab[:, :s].any()  # nothing to learn inside the history
        assert lab.sum(1).min() > 0
        assert torch.equal(y[:, :-1][lab[:, :-1]], x[:, 1:][lab[:, :-1]])  # labels are the next tokens
        for r in range(x.size(0)):  # text and longchat batches have fewer rows (their objective costs more)
            answer = tok.decode(y[r][lab[r]].tolist())
            if task == "longchat":
                assert b.blocks[r] is None
                continue
            if task == "copy":  # an induction row, short and raw: the labelled span repeats one of the history
                ans, hist = y[r][lab[r]].tolist(), x[r, :s].tolist()
                assert b.blocks[r] is None and s == 64 and len(ans) >= K - 1
                assert any(hist[i:i + len(ans)] == ans for i in range(s - len(ans) + 1))
                continue
            if task == "text":  # corpus text continued: the target is the next tokens, all labelled
                assert b.blocks[r] is None and lab[r].sum() == x.size(1) - s - 1
                assert answer in tok.decode(x[r].tolist())
                continue
            blk = b.blocks[r]
            if task.startswith("chat_") and not re.fullmatch(r" \d{5}\.", answer):  # (a short history: a pass key)
                # the reply names the fact, and the first of its blocks (the value's) holds that value
                assert answer.endswith("<|assistant_end|>") and blk and max(blk) * K < s, answer
                first = set(re.findall(r"\w+", tok.decode(x[r, blk[0] * K:(blk[0] + 1) * K].tolist())))
                assert first & set(re.findall(r"\w+", answer.replace("<|assistant_end|>", ""))), (first, answer)
                continue
            assert re.fullmatch(r" \d{5}\.", answer), answer  # the key and the "." that ends it
            # the needle's blocks: contiguous, inside the history, holding the whole needle (its label and
            # key); the key's block comes first, and for a pass key it holds every digit
            blk = b.blocks[r]
            assert sorted(blk) == list(range(min(blk), max(blk) + 1)) and max(blk) * K < s
            held = tok.decode(x[r, min(blk) * K:(max(blk) + 1) * K].tolist())
            assert re.search(r"(key|->)\D{0,20}" + answer.strip(" ."), held), (held, answer)  # label, connector, key
            first = tok.decode(x[r, blk[0] * K:(blk[0] + 1) * K].tolist())
            assert task != "passkey" or answer.strip(" .") in first
    for _ in range(6):  # the warm-up: 2-block histories here (B_h = 64 fits two raw blocks)
        b = mix.batch(2, rng, warmup=True)
        x, y, s = b.x, b.y, b.s
        assert s == 64
        lab = y != -1
        assert torch.equal(y[:, :-1][lab[:, :-1]], x[:, 1:][lab[:, :-1]])
        for r in range(2):  # the answer (a repeated span or a pass key) is in the history
            ans = y[r][lab[r]].tolist()
            hist = x[r, :s].tolist()
            assert any(hist[i:i + len(ans)] == ans for i in range(s - len(ans) + 1))


@pytest.mark.slow
def test_torchrun_mc_ranks_agree(tiny_base_env):
    args = TINY + MC + ["--num-iterations=3", "--model-tag=ddp"]
    proc = run_script("scripts.base_train", args, tiny_base_env, torchrun=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    pat = (r"rank (\d)/2 \| final train loss: (\S+) \| param checksum: (\S+) \| gistnet checksum: (\S+)"
           r" \| lensnet checksum: (\S+)")
    finals = sorted(re.findall(pat, proc.stdout))
    assert [f[0] for f in finals] == ["0", "1"], proc.stdout
    assert finals[0][1:] == finals[1][1:], proc.stdout  # same loss, identical GPT/GistNet/LensNet weights
    # and the MC midtraining under torchrun (long-context rows + chat rows) stays in sync too
    mid = run_script("scripts.mid_train", MID + ["--num-iterations=2", "--mc", "--model-tag=ddp",
                                                 "--mc-mix-multiples=1,4", "--mc-mix-batch-size=2"],
                     tiny_base_env, torchrun=2)
    assert mid.returncode == 0, mid.stdout[-2000:] + mid.stderr[-3000:]
    finals = sorted(re.findall(r"rank (\d)/2 \| mc final loss: (\S+) \| mc checksum: (\S+)", mid.stdout))
    assert [f[0] for f in finals] == ["0", "1"] and finals[0][1:] == finals[1][1:], mid.stdout


def test_train_row_share_mixes_mc_rows_and_plain_lm_rows():
    """--mc-train-row-share f: the MC objective on the first round(f B) rows, plain LM on the rest, row-weighted;
    midtraining and SFT take the mid_* shares."""
    from megacontext.checkpoint import build_mc_modules
    from megacontext.training.trainer import MCTrainer
    from megacontext.config import MCConfig
    from nanochat.gpt import GPT, config_from_depth
    torch.manual_seed(0)
    gpt = GPT(config_from_depth(1, 97, 192, aspect_ratio=32, head_dim=16))
    gpt.init_weights()
    base = dict(budget=64, tail_tokens=32, train_min_target=32, max_level=2, gist_layers=1, lens_dim=32,
                lens_heads=2, lens_layers=1, train_plain_lm=0.0)
    cfg = MCConfig(train_row_share=0.4, **base)  # 2 of 5 rows
    nets = build_mc_modules(gpt, cfg)
    x = torch.randint(0, 97, (5, 193))
    x, y = x[:, :-1], x[:, 1:]
    loss, metrics = MCTrainer(gpt, nets, cfg, seed=1).loss(x, y, step=3)
    ref_mc, _ = MCTrainer(gpt, nets, MCConfig(**base), seed=1).loss(x[:2], y[:2], step=3)
    ref_lm = gpt(x[2:], y[2:])
    assert torch.allclose(loss, (2 * ref_mc + 3 * ref_lm) / 5, atol=1e-6)
    assert metrics["mc/rest_lm_loss"] == pytest.approx(float(ref_lm.detach()), abs=1e-6)
    # `lm` (torch.compile(gpt) on CUDA) runs the plain rows: the same numbers, and only the B x T rows reach it
    shapes = []

    def lm(a, b):
        shapes.append(tuple(a.shape))
        return gpt(a, b)
    loss_lm, _ = MCTrainer(gpt, nets, cfg, seed=1, lm=lm).loss(x, y, step=3)
    assert torch.allclose(loss_lm, loss, atol=1e-6) and shapes == [(3, 192)]
    plain = MCConfig(**{**base, "train_plain_lm": 1.0})
    loss_plain, metrics = MCTrainer(gpt, build_mc_modules(gpt, plain), plain, seed=1, lm=lm).loss(x, y, step=3)
    assert shapes == [(3, 192), (5, 192)] and "mc/plain_lm_loss" in metrics
    assert torch.allclose(loss_plain, gpt(x, y), atol=1e-6)
    MCTrainer(gpt, nets, cfg, lm=torch.compile(gpt))  # what base_train passes on CUDA (not called: no compile)
    mid = MCTrainer(gpt, nets, MCConfig(**{**base, "mid_row_share": 0.4, "mid_plain_lm": 0.0}), seed=1, stage="mid")
    assert torch.allclose(mid.loss(x, y, step=3)[0], loss, atol=1e-6)  # the mid shares: the same 2 of 5 rows


def test_copy_warmup_ends_once_the_copy_loss_is_low(mc_base, capsys):
    """The warm-up takes every micro-batch until the mean loss of its last 10 copy batches is below
    --mc-warmup-exit; then (share 0 here) only chat batches follow. Exit 100 nats: ends at the 10th copy batch."""
    from scripts import mid_train
    args = MID + ["--mc", "--mc-mix-share=0", "--mc-mix-warmup=1", "--mc-warmup-rows-mult=1",
                  "--mc-mix-batch-size=2", "--mc-mix-multiples=1"]
    mid_train.main(args + ["--num-iterations=16", "--mc-warmup-exit=100"])
    out = capsys.readouterr().out
    done = re.findall(r"copy warm-up done at step (\d+)", out)
    assert len(done) == 1 and 10 <= int(done[0]) < 16, out[-3000:]
    with open(os.path.join(mc_base, "report", "midtraining.md")) as f:
        assert "Copy warm-up ended by: the GPT copying" in f.read()
    mid_train.main(args + ["--num-iterations=3", "--mc-warmup-exit=0"])  # a loss is never below 0
    assert "copy warm-up done" not in capsys.readouterr().out
