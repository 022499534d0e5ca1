"""SFT: the loss mask (only assistant tokens carry loss), padded batches, a short run whose loss falls."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from nanochat.common import UserError
from test_mid_train import make_base_checkpoint  # the tiny base checkpoint helper (tests/ is on sys.path)

CONV = {"messages": [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "You're welcome!"},
]}


def reference_rows(tok, conv):
    """ids and the exact SFT targets, built from the pieces (without the tokenizer's mask)."""
    sp = tok.encode_special
    ids, targets_of = [tok.get_bos_token_id()], [False]
    for m in conv["messages"]:
        if m["role"] == "user":
            piece = [sp("<|user_start|>")] + tok.encode(m["content"]) + [sp("<|user_end|>")]
            ids += piece
            targets_of += [False] * len(piece)
        else:
            ids += [sp("<|assistant_start|>")]
            targets_of += [False]
            piece = tok.encode(m["content"]) + [sp("<|assistant_end|>")]
            ids += piece
            targets_of += [True] * len(piece)  # the reply and its end token are predicted
    # target at position t is ids[t+1] when token t+1 is the assistant's
    return ids[:-1], [ids[t + 1] if targets_of[t + 1] else -1 for t in range(len(ids) - 1)]


def test_sft_collate_exact_targets(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    from scripts.chat_sft import sft_collate
    tok = get_tokenizer()
    short = {"messages": CONV["messages"][:2]}
    batch = [tok.render_conversation(CONV), tok.render_conversation(short)]
    x, y = sft_collate(batch, pad_id=tok.get_bos_token_id())
    ref_x0, ref_y0 = reference_rows(tok, CONV)
    ref_x1, ref_y1 = reference_rows(tok, short)
    assert x.shape == y.shape == (2, len(ref_x0))
    assert x[0].tolist() == ref_x0 and y[0].tolist() == ref_y0
    n = len(ref_x1)
    assert x[1, :n].tolist() == ref_x1 and y[1, :n].tolist() == ref_y1
    assert (y[1, n:] == -1).all() and (x[1, n:] == tok.get_bos_token_id()).all()  # padding carries no loss
    # what carries loss is exactly the assistant's words and its end tokens, nothing of the user's
    kept = y[0][y[0] >= 0].tolist()
    end = tok.encode_special("<|assistant_end|>")
    assert tok.decode([t for t in kept if t != end]) == "2 + 3 = 5You're welcome!"
    assert kept.count(end) == 2


def test_sft_loss_is_mean_over_assistant_tokens(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    from scripts.chat_sft import sft_collate
    tok = get_tokenizer()
    model = make_base_checkpoint(tiny_base_env)
    batch = [tok.render_conversation(CONV), tok.render_conversation({"messages": CONV["messages"][:2]})]
    x, y = sft_collate(batch, pad_id=tok.get_bos_token_id())
    loss = model(x, y)
    logits = model(x)
    valid = y >= 0
    ref = F.cross_entropy(logits[valid], y[valid])
    assert torch.allclose(loss, ref, atol=1e-6)
    # positions whose next token is not the assistant's get exactly zero gradient
    h = model(x, return_hidden=True).detach().requires_grad_()
    model.head(h, y).backward()
    g = h.grad.abs().sum(-1)
    assert (g[~valid] == 0).all() and (g[valid] > 0).all()
    # right padding does not change the real rows' losses (causal attention)
    row1 = model(x[1:2, :valid[1].nonzero().max() + 1], y[1:2, :valid[1].nonzero().max() + 1], loss_reduction="sum")
    full1 = model(x[1:2], y[1:2], loss_reduction="sum")
    assert torch.allclose(row1, full1, atol=1e-5)


def test_sft_batches_skip_cut_conversations_and_split_ranks(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    from scripts.chat_sft import sft_batches
    from test_mid_train import Convs
    tok = get_tokenizer()
    long_user = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    convs = [long_user] + [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                           for i in range(7)]
    x, y, _ = next(sft_batches(Convs(convs), tok, 2, max_tokens=32))
    # the first conversation, cut at 32 tokens before the assistant speaks, was skipped
    assert x.shape[1] < 31 and (y >= 0).any(dim=1).all()
    texts = {}
    for rank in (0, 1):
        x, y, _ = next(sft_batches(Convs(convs[1:]), tok, 3, max_tokens=64, rank=rank, world_size=2))
        texts[rank] = set(re.findall(r"q(\d)", tok.decode(x.flatten().tolist())))
    assert texts[0] == {"0", "2", "4"} and texts[1] == {"1", "3", "5"}


def test_chat_sft_loss_falls_and_checkpoint_loads(tiny_base_env, capsys):
    from nanochat.checkpoint_manager import load_model
    from scripts import chat_sft
    base = make_base_checkpoint(tiny_base_env, seq_len=128)
    chat_sft.main(["--source", "base", "--mixture", "offline", "--device-type", "cpu", "--device-batch-size", "4",
                   "--target-examples-per-step", "8", "--num-iterations", "30", "--init-lr-frac", "1.0",
                   "--eval-every", "30", "--eval-steps", "4", "--eval-metrics-every", "0",
                   "--eval-metrics-max-problems", "2"])
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"\| loss: ([0-9.]+)", out)]
    vals = [float(v) for v in re.findall(r"val loss: ([0-9.]+)", out)]
    assert len(losses) == 30 and len(vals) >= 2
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    assert vals[-1] < 0.8 * vals[0], vals
    assert re.search(r"Arithmetic: [0-9.]+ \| Spelling: [0-9.]+ \| Memory: [0-9.]+ \| Identity: [0-9.]+", out)
    model, tok, meta = load_model("sft", "cpu", phase="eval")
    assert meta["step"] == 30 and meta["source"] == {"stage": "base", "model_tag": "d1", "step": 0}
    assert meta["val_loss"] == pytest.approx(vals[-1], abs=1e-4)
    assert set(meta["metrics"]) == {"Arithmetic", "Spelling", "Memory", "Identity"}
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert os.path.exists(os.path.join(tiny_base_env, "report", "chat-sft.md"))


def test_chat_sft_errors(tiny_base_env):
    from scripts import chat_sft
    make_base_checkpoint(tiny_base_env)
    with pytest.raises(UserError, match="no mid checkpoints"):
        chat_sft.main(["--mixture", "offline", "--device-type", "cpu"])
    with pytest.raises(UserError, match="multiple of"):
        chat_sft.main(["--source", "base", "--mixture", "offline", "--device-type", "cpu",
                       "--device-batch-size", "3", "--target-examples-per-step", "8"])
