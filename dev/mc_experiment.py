"""
A standalone CPU experiment for the MegaContext objective (megacontext/objective.py): trains a tiny
char-level GPT + GistNet + LensNet on passkey examples (tasks/longctx.py) and plain-text LM in
natural-text filler (Python's own pydoc topics, shipped with the interpreter: no download), then
measures on held-out data:
- gist substitutability (NLL_dropped - NLL_gists) / (NLL_dropped - NLL_raw) at levels 1 and 2,
- the LM guard (NLL with gists vs no context vs raw),
- LensNet pair agreement / top-1 with counterfactual delta NLL,
- passkey exact-match accuracy at 4x / 16x the history budget: truncation vs LensNet top-1 (a single
  block focused coarse-to-fine) vs the oracle (the needle's block expanded).

    OMP_NUM_THREADS=1 python -m dev.mc_experiment --minutes 10 --out /tmp/mc_experiment.json
"""
import argparse
import json
import math
import re
import time

import numpy as np
import torch

from megacontext.config import MCConfig
from megacontext.gistnet import GistLevels, GistNet, build_gists
from megacontext.lensnet import LensNet
from megacontext.objective import (MCObjective, coarsest_wc, expand, gist_substitutability, lens_pair_agreement,
                                   pack, raw_suffix_part, wc_part)
from megacontext.telemetry import MetricWindow, format_metrics
from nanochat.common import UserError, run_main
from nanochat.gpt import GPT, GPTConfig
from tasks.longctx import passkey


class CharTok:
    """7-bit characters, one token each (non-ASCII becomes a space)."""
    vocab_size = 128

    def encode(self, text):
        return [ord(c) if ord(c) < 128 else 32 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def load_filler():
    import pydoc_data.topics as topics
    s = " ".join(topics.topics[k] for k in sorted(topics.topics))
    s = re.sub(r"\s+", " ", "".join(c if 32 <= ord(c) < 127 else " " for c in s))
    cut = int(0.9 * len(s))
    return s[:cut], s[cut:]


def passkey_batch(filler, tok, rng, B, hist, K, full_labels=False):
    """(x, y, s, examples): answer-only labels (or every next token: copy-friendly warm-up), rows padded
    after the answer to one length."""
    exs = [passkey(filler, tok, rng, hist) for _ in range(B)]
    assert all(e.question_start == hist for e in exs)
    T = max(len(e.ids) for e in exs)
    seq = torch.full((B, T), 32, dtype=torch.long)
    y = torch.full((B, T - 1), -1, dtype=torch.long)
    for b, e in enumerate(exs):
        seq[b, :len(e.ids)] = torch.tensor(e.ids)
        a, c = e.answer_span
        if full_labels:
            y[b, :c - 1] = seq[b, 1:c]
        else:
            y[b, a - 1:c - 1] = seq[b, a:c]  # position t predicts token t + 1: only the answer is scored
    return seq[:, :-1], y, hist, exs


def lm_batch(filler, tok, rng, B, T):
    ids = tok.encode(filler)
    st = rng.integers(0, len(ids) - T - 1, B)
    seq = torch.tensor(np.stack([ids[i:i + T + 1] for i in st]))
    return seq[:, :-1], seq[:, 1:]


@torch.no_grad()
def answer_correct(gpt, parts, x, y, s, wte, cfg):
    """Exact match: the argmax at every answer position is the answer token (teacher forced)."""
    p = pack(parts, x[:, s:], y[:, s:], s, wte, cfg)
    logits = gpt(inputs_embeds=p.embeds, pos=p.pos, pos_sigma=p.sigma)
    lab = p.labels
    ok = (logits.argmax(-1) == lab) | (lab == -1)
    return ok.all(1).float()


@torch.no_grad()
def top1_focus(obj, wc, reader):
    """Coarse to fine: expand the best-scored gist, rescore, until one raw block has been opened."""
    cfg = obj.cfg
    while True:
        gist = np.flatnonzero(wc.levels >= 1)
        if len(gist) == 0:
            return wc
        sc = obj.lensnet.score([wc], [reader], obj.wte)[0][0].numpy()
        j = int(gist[np.argmax(sc[gist])])
        L = int(wc.levels[j])
        wc = expand(wc, j, cfg)
        if L == 1:
            return wc


@torch.no_grad()
def eval_passkey(obj, filler, tok, rng, hist, n, K):
    cfg, wte = obj.cfg, obj.wte
    acc = {"truncation": [], "lens_top1": [], "oracle": [], "lens_found_block": []}
    for i in range(0, n, 10):
        x, y, s, exs = passkey_batch(filler, tok, rng, min(10, n - i), hist, K)
        readers = obj.readers(x, s)
        parts_t = [raw_suffix_part(x[b, :s], obj.B_h, wte, cfg) for b in range(len(exs))]
        parts_l, parts_o = [], []
        for b, e in enumerate(exs):
            base = coarsest_wc(s, cfg)
            f = top1_focus(obj, base, readers[b])
            parts_l.append(wc_part(f, readers[b], wte, cfg))
            n0, n1 = e.needle_spans[0]
            raw = set(np.flatnonzero(f.levels == 0).tolist())
            blocks = {int(f.indices[j]) for j in raw}
            acc["lens_found_block"].append(float(all(k in blocks for k in range(n0 // K, (n1 - 1) // K + 1))))
            o = base
            for blk in range(n0 // K, (n1 - 1) // K + 1):  # open every block the needle touches
                while True:
                    st = o.indices * np.power(K, np.maximum(o.levels, 1))
                    j = int(np.searchsorted(st, blk * K, side="right") - 1)
                    if o.levels[j] == 0:
                        break
                    o = expand(o, j, cfg)
            parts_o.append(wc_part(o, readers[b], wte, cfg))
        acc["truncation"] += answer_correct(obj.gpt, parts_t, x, y, s, wte, cfg).tolist()
        acc["lens_top1"] += answer_correct(obj.gpt, parts_l, x, y, s, wte, cfg).tolist()
        acc["oracle"] += answer_correct(obj.gpt, parts_o, x, y, s, wte, cfg).tolist()
    return {k: float(np.mean(v)) for k, v in acc.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget")
    ap.add_argument("--warmup-minutes", type=float, default=1.5, help="short-context copy warm-up (all raw)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-n", type=int, default=50, help="passkey examples per history length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    args = ap.parse_args()
    if args.minutes <= 0:
        raise UserError("--minutes must be positive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    K = 32
    cfg = MCConfig(block_size=K, max_level=2, budget=256, tail_tokens=32, train_hist_budget=128,
                   train_min_target=32, gist_layers=2, lens_dim=64, lens_heads=4, lens_layers=1,
                   train_plain_lm=0.2, lens_cands=48)
    tok = CharTok()
    train_fill, test_fill = load_filler()
    gpt = GPT(GPTConfig(sequence_len=512, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=4, n_embd=128))
    gpt.init_weights()
    gistnet, lensnet = GistNet(128, cfg, 4), LensNet(128, cfg)
    obj = MCObjective(gpt, gistnet, lensnet, cfg)
    params = list(gpt.parameters()) + obj.parameters_mc()
    print(f"params: gpt {gpt.num_params():,} gistnet {sum(p.numel() for p in gistnet.parameters()):,} "
          f"lensnet {sum(p.numel() for p in lensnet.parameters()):,}")
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    win = MetricWindow()
    t0, step, B_h = time.time(), 0, cfg.hist_budget()
    budget_s, warm_s = 60 * args.minutes, 60 * args.warmup_minutes
    while time.time() - t0 < budget_s:
        el = time.time() - t0
        lr = 3e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * el / budget_s)))
        for g in opt.param_groups:
            g["lr"] = lr
        if el < warm_s:  # copy warm-up: short histories, everything raw
            x, y, s, _ = passkey_batch(train_fill, tok, rng, args.batch, int(rng.choice([64, 96, 128])), K,
                                         full_labels=True)
        elif step % 3 == 2:  # plain text LM through the objective (random split)
            x, y = lm_batch(train_fill, tok, rng, args.batch // 2, 640)
            s = None
        else:
            hist = int(rng.choice([128, 256, 512, 1024, 2048], p=[0.1, 0.2, 0.3, 0.2, 0.2]))
            x, y, s, _ = passkey_batch(train_fill, tok, rng, args.batch, hist, K)
        loss, m = obj.loss(x, y, rng, step, s=s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        win.add({"train/loss": loss.detach(), **m})
        step += 1
        if step % 50 == 0:
            print(f"step {step} t={time.time() - t0:.0f}s lr={lr:.1e} "
                  + format_metrics(win.flush(), keys=["train/", "mc/loss_by_variant", "mc/lens_", "mc/delta",
                                                     "mc/plain", "mc/gist_ms", "mc/lm_ms", "mc/counterfactual_ms"]),
                  flush=True)
    train_s = time.time() - t0
    print(f"trained {step} steps in {train_s:.0f}s; evaluating", flush=True)
    gpt.eval()
    erng = np.random.default_rng(12345)
    res = {"steps": step, "train_s": train_s, "config": cfg.to_dict()}
    x, y = lm_batch(test_fill, tok, erng, 16, 512 + 64)
    res["lm_level1_hist512"] = gist_substitutability(gpt, gistnet, x, y, 512, cfg, level=1)
    x, y = lm_batch(test_fill, tok, erng, 8, 1536 + 64)
    res["lm_level2_hist1536"] = gist_substitutability(gpt, gistnet, x, y, 1536, cfg, level=2)
    for hist in (512, 2048):
        x, y, s, _ = passkey_batch(test_fill, tok, erng, 10, hist, K)
        res[f"lens_agreement_passkey_{hist}"] = lens_pair_agreement(obj, x, y, s, erng)
    x, y = lm_batch(test_fill, tok, erng, 8, 512 + 64)
    res["lens_agreement_lm_512"] = lens_pair_agreement(obj, x, y, 512, erng)
    for hist in (4 * B_h, 16 * B_h):
        res[f"passkey_{hist // B_h}x"] = eval_passkey(obj, test_fill, tok, erng, hist, args.eval_n, K)
    res["eval_s"] = time.time() - t0 - train_s
    print(json.dumps(res, indent=1, default=float))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=float)


if __name__ == "__main__":
    run_main(main)
