"""
Checkpoints: save -> load gives identical logits (and optimizer state), files are written
atomically, the newest step / largest model are found, and missing checkpoints are user errors
that name the directory and the command to run.
"""
import json
import os

import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import setup_optimizers
from nanochat import checkpoint_manager as cm


def make_model(vocab, depth=1, seed=0):
    torch.manual_seed(seed)
    model = GPT(config_from_depth(depth, vocab, 32, aspect_ratio=32, head_dim=16))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.02)
    return model


def one_step(model, opts, vocab):
    x = torch.randint(0, vocab, (2, 16))
    model(x, x.roll(-1, dims=1)).backward()
    for o in opts:
        o.step()
    model.zero_grad(set_to_none=True)


def test_round_trip_identical_logits_and_optimizer(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    vocab = get_tokenizer().get_vocab_size()
    model = make_model(vocab)
    opts = setup_optimizers(model)
    one_step(model, opts, vocab)
    ckpt_dir = os.path.join(tiny_base_env, "base_checkpoints", "d1")
    gist = {"w": torch.randn(3, 4)}
    meta = {"model_config": model.config_dict(), "user_config": {"depth": 1}, "step": 7, "val_bpb": 1.5,
            "dataloader_state": [{"epoch": 0}], "mc_config": {"budget": 512}}
    cm.save_checkpoint(ckpt_dir, 7, {"gpt": model.state_dict(), "gistnet": gist},
                       [o.state_dict() for o in opts], meta, rank=0)
    names = sorted(os.listdir(ckpt_dir))
    assert names == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt"]  # no temp files

    loaded, tok, meta2 = cm.load_model("base", torch.device("cpu"), phase="eval")
    assert not loaded.training
    assert meta2["step"] == 7 and meta2["mc_config"] == {"budget": 512}
    assert torch.equal(meta2["model_data"]["gistnet"]["w"], gist["w"])
    ids = torch.randint(0, vocab, (2, 20))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    # loaded weights are trainable parameters, not frozen buffers
    assert all(p.requires_grad for p in loaded.parameters())

    # optimizer state round trip: one more identical step on both copies gives identical weights
    _, optim_data, _ = cm.load_checkpoint(ckpt_dir, 7, torch.device("cpu"), load_optimizer=True)
    loaded.train()
    opts2 = setup_optimizers(loaded)
    for o, sd in zip(opts2, optim_data):
        o.load_state_dict(sd)
    model.train()
    torch.manual_seed(3)
    one_step(model, opts, vocab)
    torch.manual_seed(3)
    one_step(loaded, opts2, vocab)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n


def test_compiled_prefix_is_stripped(tmp_path):
    model = make_model(64)
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    cm.save_checkpoint(str(tmp_path), 1, {"gpt": sd}, None, {"step": 1}, rank=0)
    data, optim, _ = cm.load_checkpoint(str(tmp_path), 1, "cpu")
    assert optim is None
    assert set(data["gpt"]) == set(model.state_dict())


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "model_000001.pt")

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        cm.atomic_write(path, crash)
    assert os.listdir(tmp_path) == []
    # an existing good file survives a crashed overwrite
    cm.save_meta(str(tmp_path), 1, {"step": 1})
    with pytest.raises(OSError):
        cm.atomic_write(str(tmp_path / "meta_000001.json"), crash)
    with open(tmp_path / "meta_000001.json") as f:
        assert json.load(f) == {"step": 1}


def test_per_rank_optimizer_files(tmp_path):
    model = make_model(64)
    for rank in (0, 1):
        cm.save_checkpoint(str(tmp_path), 3, {"gpt": model.state_dict()}, {"rank": rank}, {"step": 3}, rank=rank)
    assert sorted(os.listdir(tmp_path)) == ["meta_000003.json", "model_000003.pt",
                                            "optim_000003_rank0.pt", "optim_000003_rank1.pt"]
    _, o1, _ = cm.load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True, rank=1)
    assert o1 == {"rank": 1}
    with pytest.raises(UserError, match="rank2"):
        cm.load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True, rank=2)


def test_find_last_step_and_largest_model(tmp_path):
    model = make_model(64)
    d = tmp_path / "base_checkpoints"
    for step in (5, 40, 100):
        cm.save_checkpoint(str(d / "d2"), step, {"gpt": model.state_dict()}, None, {"step": step})
    os.makedirs(d / "d12")
    os.makedirs(d / "d9")
    assert cm.find_last_step(str(d / "d2")) == 100
    assert cm.find_largest_model(str(d)) == "d12"  # numeric, not lexicographic
    with pytest.raises(UserError):
        cm.find_last_step(str(d / "d12"))


def test_missing_checkpoints_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError) as e:
        cm.load_model("base", "cpu", "eval")
    assert "base_checkpoints" in str(e.value) and "scripts.base_train" in str(e.value)
    with pytest.raises(UserError) as e:
        cm.load_model("sft", "cpu", "eval")
    assert "chatsft_checkpoints" in str(e.value) and "scripts.chat_sft" in str(e.value)
    os.makedirs(tmp_path / "mid_checkpoints" / "d4")
    with pytest.raises(UserError) as e:
        cm.load_model("mid", "cpu", "eval")
    assert "d4" in str(e.value) and "scripts.mid_train" in str(e.value)
    with pytest.raises(UserError, match="model tag 'd7'"):
        cm.load_model("mid", "cpu", "eval", model_tag="d7")
    with pytest.raises(UserError):
        cm.load_model("nope", "cpu", "eval")


def test_vocab_mismatch_is_a_user_error(tiny_base_env):
    model = make_model(100)  # the tiny tokenizer has 512 tokens
    ckpt_dir = os.path.join(tiny_base_env, "base_checkpoints", "d1")
    cm.save_checkpoint(ckpt_dir, 1, {"gpt": model.state_dict()}, None,
                       {"model_config": model.config_dict(), "step": 1})
    with pytest.raises(UserError, match="tokenizer"):
        cm.load_model("base", "cpu", "eval")


def test_mc_flags_override_a_checkpoint_config_and_are_validated_merged():
    """A later stage's --mc-* flags override the checkpoint's MCConfig field by field (not the ARCHITECTURE
    fields); the result is validated, not the flags alone: --mc-train-hist-budget 96 is legal beside the
    checkpoint's 32 tail tokens, though it would not be beside a tail of 128."""
    import argparse
    from megacontext.training.trainer import resolve_mc_config
    from megacontext.config import MCConfig, add_mc_args
    parser = add_mc_args(argparse.ArgumentParser())
    src = {"mc_config": MCConfig(budget=192, tail_tokens=32).to_dict()}
    cfg = resolve_mc_config(parser.parse_args(["--mc-budget", "224", "--mc-train-hist-budget", "96"]), src)
    assert (cfg.budget, cfg.tail_tokens, cfg.train_hist_budget, cfg.hist_budget()) == (224, 32, 96, 96)
    assert resolve_mc_config(parser.parse_args([]), src) == MCConfig(budget=192, tail_tokens=32)
    with pytest.raises(UserError, match="train_hist_budget"):  # the merged config is still checked
        resolve_mc_config(parser.parse_args(["--mc-train-hist-budget", "40"]), src)  # < tail + K
    with pytest.raises(UserError, match="cannot change between stages"):
        resolve_mc_config(parser.parse_args(["--mc-block-size", "16"]), src)


def test_an_explicit_mc_flag_wins_over_the_checkpoint_even_when_it_equals_the_default():
    """`--mc-budget 512` on a checkpoint trained at 224 reads 512: a flag given on the command line is never
    mistaken for one left out, whatever its value (512 is MCConfig's own default budget)."""
    import argparse
    from megacontext.training.trainer import resolve_mc_config
    from megacontext.config import MCConfig, add_mc_args
    parser = add_mc_args(argparse.ArgumentParser())
    src = {"mc_config": MCConfig(budget=224, tail_tokens=32, train_hist_budget=96, gist_bow_weight=0.0).to_dict()}
    assert MCConfig().budget == 512 and MCConfig().gist_bow_weight == 1.0
    cfg = resolve_mc_config(parser.parse_args(["--mc-budget", "512", "--mc-gist-bow-weight", "1.0"]), src)
    assert (cfg.budget, cfg.gist_bow_weight) == (512, 1.0)
    assert (cfg.tail_tokens, cfg.train_hist_budget) == (32, 96)  # what the flags do not name stays the checkpoint's
    left_out = resolve_mc_config(parser.parse_args([]), src)
    assert (left_out.budget, left_out.gist_bow_weight) == (224, 0.0)


def test_a_fresh_mc_config_is_sized_from_the_gpt_sequence_length():
    import argparse
    from megacontext.config import MCConfig, add_mc_args, mc_config_from_args
    parser = add_mc_args(argparse.ArgumentParser())
    sized = {T: mc_config_from_args(parser.parse_args([]), seq_len=T) for T in (256, 2048)}
    assert [(c.budget, c.tail_tokens, c.train_hist_budget) for c in sized.values()] == [(256, 32, 96),
                                                                                         (2048, 256, 768)]
    given = mc_config_from_args(parser.parse_args(["--mc-budget", "224"]), seq_len=256)
    assert (given.budget, given.tail_tokens, given.train_hist_budget) == (224, 32, 96)
    assert mc_config_from_args(parser.parse_args(["--mc-tail-tokens", "64"]), seq_len=256).tail_tokens == 64
    assert MCConfig.from_dict(dict(MCConfig(budget=192, tail_tokens=32).to_dict(), train_hist_budget=0)) \
        .train_hist_budget == 96  # an older checkpoint's 0: max(budget // 2, tail + K)


def test_mc_config_of_an_older_checkpoint_drops_retired_fields():
    from megacontext.config import MCConfig
    old = dict(MCConfig(budget=224).to_dict(), gist_shared=True)  # a field older checkpoints stored
    assert MCConfig.from_dict(old) == MCConfig(budget=224)
    with pytest.raises(ValueError, match="unknown MegaContext config fields"):
        MCConfig.from_dict(dict(old, budgett=224))


def test_save_keeps_only_the_newest_steps(tmp_path):
    model = make_model(100)
    d = str(tmp_path / "ck")
    for step in (1, 2, 3, 4):
        cm.save_checkpoint(d, step, {"gpt": model.state_dict()}, [{"s": step}], {"step": step}, keep=2)
    assert sorted(os.listdir(d)) == ["meta_000003.json", "meta_000004.json", "model_000003.pt", "model_000004.pt",
                                     "optim_000003_rank0.pt", "optim_000004_rank0.pt"]
    cm.save_checkpoint(d, 5, {"gpt": model.state_dict()}, None, {"step": 5})  # keep=None: nothing deleted
    assert cm.find_last_step(d) == 5 and len(os.listdir(d)) == 8
