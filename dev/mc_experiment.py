"""
A standalone CPU experiment for the MegaContext retrieval recipe (megacontext/retrieval.py): a tiny
char-level GPT + GistNet + LensNet (the project's modules) on passkey examples (tasks/longctx.py) and
plain-text LM in natural-text filler (Python's own pydoc topics, shipped with the interpreter: no
download). Phases: (1) copy warm-up on short all-raw rows until short-copy exact match passes
--warmup-em; (2) `needle_loss` on gisted histories of 1x-64x the history budget B_h (needle opened,
answer-weighted, LensNet coarse/fine/redirect listwise into GistNet) mixed with LM through
`MCObjective.loss` (raw windows of the evaluated lengths and gisted histories). Then, held out:
- passkey exact match at 4x / 16x / 64x / 256x B_h: truncation vs LensNet coarse-to-fine top-1 (within
  B_h) vs the oracle (the key's block opened), and LensNet's hit rate on the key block,
- gist substitutability (NLL_dropped - NLL_gists) / (NLL_dropped - NLL_raw) at levels 1 and 2 and the
  LM guard (NLL with gists vs no context vs raw),
- LensNet pair agreement / top-1 with counterfactual delta NLL.

    OMP_NUM_THREADS=1 python -m dev.mc_experiment --minutes 33 --out /tmp/mc_experiment.json
"""
import argparse
import json
import math
import re
import time

import numpy as np
import torch

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet
from megacontext.lensnet import LensNet
from megacontext.objective import (MCObjective, coarsest_wc, expand, gist_substitutability, lens_pair_agreement, pack,
                                   raw_suffix_part, wc_part)
from megacontext.retrieval import needle_loss, open_blocks
from megacontext.working_context import wc_cost
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


def passkey_batch(filler, tok, rng, B, hist, K, answer_weight=5.0):
    """(x, y, s, examples, weights): every next token of the target segment [question ; answer] is
    labelled (the history's labels are the caller's business: x[:, :s] is history), the answer tokens
    weigh `answer_weight` in `weights` (B, T - s); rows are padded after the answer (label -1). The key
    lies inside one aligned K-block (key_in_block), so one opened block holds the whole answer."""
    exs = [passkey(filler, tok, rng, hist, key_in_block=K) for _ in range(B)]
    assert all(e.question_start == hist for e in exs)
    T = max(len(e.ids) for e in exs)
    seq = torch.full((B, T), 32, dtype=torch.long)
    y = torch.full((B, T - 1), -1, dtype=torch.long)
    w = torch.ones(B, T - 1 - hist)
    for b, e in enumerate(exs):
        seq[b, :len(e.ids)] = torch.tensor(e.ids)
        a, c = e.answer_span
        y[b, :c - 1] = seq[b, 1:c]
        w[b, a - 1 - hist:c - 1 - hist] = answer_weight
    return seq[:, :-1], y, hist, exs, w


def answer_only(y, exs, s):
    """Labels of the answer tokens only (the exact-match target)."""
    out = torch.full_like(y, -1)
    for b, e in enumerate(exs):
        a, c = e.answer_span
        out[b, a - 1:c - 1] = y[b, a - 1:c - 1]
    return out


def key_blocks(exs, K):
    return [e.key_spans[0][0] // K for e in exs]


def lm_batch(filler, tok, rng, B, T):
    ids = tok.encode(filler)
    st = rng.integers(0, len(ids) - T - 1, B)
    seq = torch.tensor(np.stack([ids[i:i + T + 1] for i in st]))
    return seq[:, :-1], seq[:, 1:]


def repeat_batch(filler, tok, rng, B, T):
    """Copy-friendly LM rows (induction aid, prototype v1): a 16-48 token span re-appears later in the row."""
    x, y = lm_batch(filler, tok, rng, B, T)
    seq = torch.cat([x, y[:, -1:]], 1)
    for b in range(B):
        n = int(rng.integers(16, 49))
        i = int(rng.integers(0, T // 2 - n))
        j = int(rng.integers(i + n + 8, T + 1 - n))
        seq[b, j:j + n] = seq[b, i:i + n].clone()
    return seq[:, :-1], seq[:, 1:]


def induction_batch(rng, B, n_max=40):
    """Pure induction rows (the fastest way to grow copy heads): a random string of digits and letters,
    then the same string again; only the repeat is labelled (the first copy is unpredictable)."""
    alphabet = np.frombuffer(b"0123456789abcdefghijklmnopqrstuvwxyz", dtype=np.uint8).astype(np.int64)
    T = 2 * n_max + 1
    seq = torch.full((B, T), 32, dtype=torch.long)
    y = torch.full((B, T - 1), -1, dtype=torch.long)
    for b in range(B):
        n = int(rng.integers(8, n_max + 1))
        r = torch.from_numpy(alphabet[rng.integers(0, len(alphabet), n)])
        seq[b, :2 * n] = torch.cat([r, r])
        y[b, n:2 * n - 1] = seq[b, n + 1:2 * n]
    return seq[:, :-1], y


def raw_weighted_loss(gpt, x, y, w_full):
    losses = gpt(x, y, loss_reduction="none").view(y.shape)
    w = w_full * (y != -1)
    return (losses * w).sum() / w.sum().clamp_min(1e-6)


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
    """Coarse to fine within B_h: expand the best-scored gist whose expansion still leaves room to reach
    a raw block (a level-L gist needs L * (K - 1) more), rescore, until a raw block has been opened.
    A later pass may pick another region ("look elsewhere") while the budget allows."""
    cfg, K = obj.cfg, obj.cfg.block_size
    while True:
        room = obj.B_h - wc_cost(wc, K)
        gist = np.flatnonzero((wc.levels >= 1) & (wc.levels * (K - 1) <= room))
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
    """Exact match (teacher forced) of truncation / LensNet c2f top-1 / oracle, LensNet's hit rate on
    the key block, and the largest WC cost LensNet's focus used (must stay <= B_h)."""
    cfg, wte = obj.cfg, obj.wte
    acc = {"truncation": [], "lens_top1": [], "oracle": [], "lens_hit": []}
    max_cost, chunk = 0, max(1, min(10, 16384 // hist))
    for i in range(0, n, chunk):
        x, y, s, exs, _ = passkey_batch(filler, tok, rng, min(chunk, n - i), hist, K)
        y = answer_only(y, exs, s)
        readers = obj.readers(x, s)
        parts_t = [raw_suffix_part(x[b, :s], obj.B_h, wte, cfg) for b in range(len(exs))]
        parts_l, parts_o = [], []
        for b, blk in enumerate(key_blocks(exs, K)):
            f = top1_focus(obj, coarsest_wc(s, cfg), readers[b])
            max_cost = max(max_cost, wc_cost(f, K))
            parts_l.append(wc_part(f, readers[b], wte, cfg))
            acc["lens_hit"].append(float(any(f.levels[j] == 0 and f.indices[j] == blk for j in range(len(f)))))
            parts_o.append(wc_part(open_blocks(coarsest_wc(s, cfg), [blk], cfg), readers[b], wte, cfg))
        acc["truncation"] += answer_correct(obj.gpt, parts_t, x, y, s, wte, cfg).tolist()
        acc["lens_top1"] += answer_correct(obj.gpt, parts_l, x, y, s, wte, cfg).tolist()
        acc["oracle"] += answer_correct(obj.gpt, parts_o, x, y, s, wte, cfg).tolist()
    out = {k: float(np.mean(v)) for k, v in acc.items()}
    out.update(n=n, hist=hist, lens_max_cost=int(max_cost))
    return out


@torch.no_grad()
def short_copy_em(gpt, filler, tok, rng, n=32, hist=128, K=32):
    """Exact match on short all-raw passkey rows (the warm-up's exit test)."""
    x, y, s, exs, _ = passkey_batch(filler, tok, rng, n, hist, K)
    y = answer_only(y, exs, s)
    logits = gpt(x)
    return float(((logits.argmax(-1) == y) | (y == -1)).all(1).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget (all phases)")
    ap.add_argument("--warmup-minutes", type=float, default=6.0, help="cap of the short-context copy warm-up")
    ap.add_argument("--warmup-em", type=float, default=0.6, help="warm-up ends when short-copy exact match passes this")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--step-tokens", type=int, default=12288, help="history tokens per retrieval step (sets B)")
    ap.add_argument("--hist-budget", type=int, default=192, help="B_h: the WC budget of a history")
    ap.add_argument("--layers", type=int, default=4, help="GPT depth")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--proj-init-std", type=float, default=0.02,
                    help="re-init the GPT's c_proj weights N(0, std) (0: keep nanochat's zero init)")
    ap.add_argument("--emb-lr-mult", type=float, default=10.0, help="token embedding lr = lr * this")
    ap.add_argument("--answer-weight", type=float, default=5.0)
    ap.add_argument("--lm-share", type=float, default=0.3, help="share of post-warm-up steps that train LM")
    ap.add_argument("--eval-n", type=int, default=100, help="passkey examples per history length (4x, 16x)")
    ap.add_argument("--eval-mults", default="4,16,64,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default="", help="start from modules saved by --save (skips the warm-up if "
                    "--warmup-minutes is 0)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --init without training")
    ap.add_argument("--save", default="", help="save the trained modules here (torch.save)")
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    args = ap.parse_args()
    if args.minutes <= 0:
        raise UserError("--minutes must be positive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    K = 32
    cfg = MCConfig(block_size=K, max_level=2, budget=256, tail_tokens=32, train_hist_budget=args.hist_budget,
                   train_min_target=32, gist_layers=2, lens_dim=64, lens_heads=4, lens_layers=2,
                   train_plain_lm=0.5, train_variants="pyramid,random", lens_weight=0.0)
    B_h = cfg.hist_budget()
    tok = CharTok()
    train_fill, test_fill = load_filler()
    gpt = GPT(GPTConfig(sequence_len=2048, vocab_size=tok.vocab_size, n_layer=args.layers, n_head=4, n_kv_head=4,
                        n_embd=128))
    gpt.init_weights()
    if args.proj_init_std > 0:  # zero-init residual projections stall induction heads under AdamW (dev/LOG.md)
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                if name.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, std=args.proj_init_std)
    gistnet, lensnet = GistNet(128, cfg, 4), LensNet(128, cfg)
    if args.init:
        ck = torch.load(args.init, map_location="cpu")
        if ck.get("layers") != args.layers or MCConfig.from_dict(ck["mc_config"]) != cfg:
            raise UserError(f"{args.init} was trained with another --layers / MegaContext config")
        for mod, key in ((gpt, "gpt"), (gistnet, "gistnet"), (lensnet, "lensnet")):
            mod.load_state_dict(ck[key])
    obj = MCObjective(gpt, gistnet, lensnet, cfg)  # lens_weight 0: its .loss() is the LM objective here
    params = list(gpt.parameters()) + obj.parameters_mc()
    print(f"params: gpt {gpt.num_params():,} gistnet {sum(p.numel() for p in gistnet.parameters()):,} "
          f"lensnet {sum(p.numel() for p in lensnet.parameters()):,}; B_h={B_h}", flush=True)
    emb = gpt.transformer.wte.weight  # std-1 embeddings barely move at the matrices' lr (nanochat: Adam 0.2)
    opt = torch.optim.AdamW([{"params": [emb], "mult": args.emb_lr_mult},
                             {"params": [p for p in params if p is not emb], "mult": 1.0}],
                            lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    win = MetricWindow()
    t0, step, warm, warm_end = time.time(), 0, args.warmup_minutes > 0, None
    budget_s, warm_s = 60 * args.minutes, 60 * args.warmup_minutes
    mults = np.array([1, 2, 4, 8, 16, 32, 64])
    mult_p = np.array([0.08, 0.08, 0.2, 0.14, 0.2, 0.12, 0.18])
    vrng = np.random.default_rng(999)
    if args.eval_only and not args.init:
        raise UserError("--eval-only needs --init")
    while not args.eval_only and time.time() - t0 < budget_s:
        el = time.time() - t0
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * el / budget_s)))
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"]
        if warm:  # copy warm-up: short all-raw rows, every token labelled, the answer weighted
            kind = ("passkey", "passkey", "passkey", "induction")[step % 4]
            if kind == "induction":
                x, y = induction_batch(rng, 2 * args.batch)
                wf = torch.ones(y.shape)
            else:
                x, y, s, _, w = passkey_batch(train_fill, tok, rng, 2 * args.batch, int(rng.choice([64, 96, 128])), K,
                                              args.answer_weight)
                wf = torch.ones(y.shape)
                wf[:, s:] = w
            loss = raw_weighted_loss(gpt, x, y, wf)
            m = {"warm/loss": loss.detach(), f"warm/{kind}": loss.detach()}
        elif rng.random() < args.lm_share:  # LM: raw windows of the evaluated lengths, or gisted histories
            s = int(rng.choice([512, 1536]))
            x, y = lm_batch(train_fill, tok, rng, 4 if s == 512 else 2, s + 64)
            loss, m = obj.loss(x, y, rng, step, s=s)
        else:  # retrieval: gisted histories of 1x-64x B_h, needle opened, LensNet listwise into GistNet
            hist = int(B_h * rng.choice(mults, p=mult_p))
            B = int(np.clip(args.step_tokens // hist, 1, args.batch))
            x, y, s, exs, w = passkey_batch(train_fill, tok, rng, B, hist, K, args.answer_weight)
            loss, m = needle_loss(obj, x, y, s, key_blocks(exs, K), rng, weights=w)
            m = {**m, f"mc/needle_lm_{hist // B_h}x": m["mc/needle_lm"]}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        win.add({"train/loss": loss.detach(), **m})
        step += 1
        if warm and step % 25 == 0:
            em = short_copy_em(gpt, test_fill, tok, vrng)
            print(f"warm-up step {step} t={time.time() - t0:.0f}s short-copy EM {em:.2f}", flush=True)
            if em > args.warmup_em or time.time() - t0 > warm_s:
                warm, warm_end = False, {"step": step, "s": time.time() - t0, "em": em}
                print(f"=== warm-up ended {warm_end}", flush=True)
        if step % 50 == 0:
            print(f"step {step} t={time.time() - t0:.0f}s lr={lr:.1e} "
                  + format_metrics(win.flush(), keys=["train/", "warm/", "mc/needle_lm", "mc/lens_", "mc/loss_by",
                                                     "mc/plain", "mc/gist_ms", "mc/lm_ms", "mc/lens_ms"]),
                  flush=True)
    train_s = time.time() - t0
    print(f"trained {step} steps in {train_s:.0f}s; evaluating", flush=True)
    if args.save:
        torch.save({"gpt": gpt.state_dict(), "gistnet": gistnet.state_dict(), "lensnet": lensnet.state_dict(),
                    "mc_config": cfg.to_dict(), "layers": args.layers}, args.save)
    gpt.eval()
    res = {"steps": step, "train_s": train_s, "warmup": warm_end, "config": cfg.to_dict(), "args": vars(args)}
    res.update(evaluate(obj, test_fill, tok, args, K))
    res["eval_s"] = time.time() - t0 - train_s
    print(json.dumps(res, indent=1, default=float))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=float)


def evaluate(obj, test_fill, tok, args, K):
    gpt, gistnet, cfg, B_h = obj.gpt, obj.gistnet, obj.cfg, obj.B_h
    erng = np.random.default_rng(12345)
    res = {}
    for mult in [int(v) for v in args.eval_mults.split(",") if v]:
        n = args.eval_n if mult <= 16 else max(10, args.eval_n // (2 if mult <= 64 else 4))
        t = time.time()
        res[f"passkey_{mult}x"] = eval_passkey(obj, test_fill, tok, erng, mult * B_h, n, K)
        print(f"passkey {mult}x ({time.time() - t:.0f}s): {res[f'passkey_{mult}x']}", flush=True)
    x, y = lm_batch(test_fill, tok, erng, 16, 512 + 64)
    res["lm_level1_hist512"] = gist_substitutability(gpt, gistnet, x, y, 512, cfg, level=1)
    x, y = lm_batch(test_fill, tok, erng, 8, 1536 + 64)
    res["lm_level2_hist1536"] = gist_substitutability(gpt, gistnet, x, y, 1536, cfg, level=2)
    print("substitutability:", res["lm_level1_hist512"], res["lm_level2_hist1536"], flush=True)
    for mult in (4, 16):
        x, y, s, exs, _ = passkey_batch(test_fill, tok, erng, 8, mult * B_h, K)
        res[f"lens_agreement_passkey_{mult}x"] = lens_pair_agreement(obj, x, answer_only(y, exs, s), s, erng)
    x, y = lm_batch(test_fill, tok, erng, 8, 512 + 64)
    res["lens_agreement_lm_512"] = lens_pair_agreement(obj, x, y, 512, erng)
    print("agreement:", {k: v for k, v in res.items() if k.startswith("lens_agreement")}, flush=True)
    return res


if __name__ == "__main__":
    run_main(main)
