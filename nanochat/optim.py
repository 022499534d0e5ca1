"""
Optimizers, nanochat style:
- Muon (momentum + Newton-Schulz orthogonalisation) for the 2D matrices of the transformer blocks
- AdamW (torch) for the token embedding, the lm_head and any extra modules (the MegaContext nets)

Distributed training does not use the DDP wrapper: after the backward passes of a step, every rank
calls `sync_grads(params)`, which averages gradients with all_reduce. That is one code path for the
GPT and for every extra module (GistNet, LensNet), works on gloo (CPU) and NCCL, and keeps the
optimizers themselves single-process (every rank holds identical weights and optimizer state).
"""
import math

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# Muon

def zeropower_via_newtonschulz5(G, steps=5):
    """
    Approximately orthogonalise G (replace its singular values by ~1) with a quintic Newton-Schulz
    iteration whose coefficients maximise the slope at zero (Keller Jordan's Muon). bf16 on CUDA
    for speed; fp32 elsewhere (CPU bf16 matmuls are slow and we want bit-reproducible resumes).
    """
    assert G.ndim >= 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """
    MomentUm Orthogonalized by Newton-schulz: SGD-momentum whose update is orthogonalised, then
    scaled by sqrt(max(1, rows/cols)). Only for 2D weight matrices (not embeddings, not lm_head).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes 2D matrices, got a parameter of shape {tuple(p.shape)}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "Muon does not support closures"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                g = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                g = zeropower_via_newtonschulz5(g, steps=group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(g.to(p.dtype), alpha=-group["lr"] * scale)


# -----------------------------------------------------------------------------
# optimizer set-up

def setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                     extra_adamw_params=None):
    """
    Returns [adamw, muon] for a GPT:
    - Muon (lr=matrix_lr) over every parameter of model.transformer.h (all 2D)
    - AdamW over lm_head (unembedding_lr) and wte (embedding_lr), both scaled by (n_embd/768)^-0.5
      as in nanochat (wider models take smaller AdamW steps), and the smear gate (embedding_lr / 10)
    - extra_adamw_params (the MegaContext nets): an iterable of tensors (one group at unembedding_lr)
      or of param-group dicts {"params": [...], "lr": base_lr, ...}; their lr is scaled the same way.
    Every group gets "initial_lr" so that the LR schedule multiplies it.
    """
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5
    matrix_params = list(model.transformer.h.parameters())
    adam_groups = [
        dict(params=list(model.lm_head.parameters()), lr=unembedding_lr * dmodel_lr_scale),
        dict(params=list(model.transformer.wte.parameters()), lr=embedding_lr * dmodel_lr_scale),
        dict(params=[model.smear], lr=0.1 * embedding_lr * dmodel_lr_scale),  # a gate: ~0.05 a step at d=128
    ]
    if extra_adamw_params is not None:
        extra = list(extra_adamw_params)
        if extra and isinstance(extra[0], dict):
            for g in extra:
                g = dict(g)
                g["params"] = list(g["params"])
                g["lr"] = g.get("lr", unembedding_lr) * dmodel_lr_scale
                adam_groups.append(g)
        elif extra:
            adam_groups.append(dict(params=extra, lr=unembedding_lr * dmodel_lr_scale))
    # a parameter in two groups would be stepped twice (e.g. a net that reuses the GPT's wte)
    seen = set()
    for p in matrix_params + [p for g in adam_groups for p in g["params"]]:
        if id(p) in seen:
            raise ValueError("a parameter appears in more than one optimizer group "
                             "(do not pass GPT parameters as extra_adamw_params)")
        seen.add(id(p))
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise ValueError(f"GPT parameters not covered by any optimizer: {missing}")
    # fused AdamW is CUDA-only in practice; the default (foreach) works everywhere
    fused = model.get_device().type == "cuda"
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=fused)
    muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


# -----------------------------------------------------------------------------
# gradient averaging across ranks (DDP without the wrapper)

@torch.no_grad()
def clip_grads(modules, max_norm):
    """
    Clip the grad norm of each module on its own (the GPT, GistNet, LensNet, the reranker) and return the
    norm over all of them before clipping (for the log). One global clip would let the largest gradients
    (the GPT's LM loss) scale every small net's step down with them: the reranker, whose loss is a small
    listwise CE, barely moved under a global clip of 1.0 in midtraining (dev/LOG.md, 2026-11-22).
    """
    norms = [torch.nn.utils.clip_grad_norm_(list(m.parameters()), max_norm) for m in modules]
    # a module without grads (the reranker outside midtraining) gets a CPU zero from torch, the others a
    # norm on their device: add them up as Python floats (on CUDA, one stack across devices raised)
    return math.sqrt(sum(float(n) ** 2 for n in norms))


def sync_grads(params, bucket_numel=2**24):
    """
    Average .grad over all ranks (no-op without an initialised process group or with one rank).
    A parameter whose grad is None on some ranks but not others gets a zero grad first (otherwise
    the ranks would issue different collectives and hang); one that has no grad anywhere stays None,
    exactly as in single-process training. Grads are flattened into buckets to make few collectives.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    if world_size == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = []
    for p, h in zip(params, has.tolist()):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            live.append(p)
    # bucket by (device, dtype) and size
    buckets, cur, cur_n, cur_key = [], [], 0, None
    for p in live:
        key = (p.grad.device, p.grad.dtype)
        if cur and (key != cur_key or cur_n + p.numel() > bucket_numel):
            buckets.append(cur)
            cur, cur_n = [], 0
        cur.append(p)
        cur_n += p.numel()
        cur_key = key
    if cur:
        buckets.append(cur)
    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
        flat.div_(world_size)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
