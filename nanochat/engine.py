"""
Efficient inference with a KV cache: the prompt is prefilled once at batch size 1, the cache is
copied into `num_samples` rows, and each step then feeds one token per row.

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=2, max_tokens=64):
        ...  # one token per sample per step; mask 1 = sampled, 0 = forced
    results, masks = engine.generate_batch(prompt_ids, num_samples=2, max_tokens=64)

A row stops at <|assistant_end|> or <|bos|>. The tool-use (calculator) state machine of nanochat is
left out: every token is sampled, so masks are all 1 (kept in the interface for chat training).
"""
import torch
import torch.nn.functional as F

from nanochat.common import autocast_ctx, compute_dtype
from nanochat.tokenizer import chat_stop_ids


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> next tokens (B, 1). temperature 0 is greedy; top_k restricts to the k best."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return idx.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


class Engine:

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """
        tokens: the prompt, a list of ints. Yields (token_column, token_masks) per step: lists of
        num_samples ints. Rows that have stopped keep receiving their stop token (mask 1) until all
        rows stop or max_tokens steps have been generated; generate_batch trims them.
        """
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of ints")
        model = self.model
        device = model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        stops = chat_stop_ids(self.tokenizer)
        if max_tokens is None:
            max_tokens = model.config.sequence_len  # a sane cap; positions beyond it still work (RoPE)
        # 1) prefill the prompt once, at batch size 1
        # the cache holds K/V in the autocast dtype (bf16 on recent GPUs), or attention would mix dtypes
        kv_cache = model.new_kv_cache(batch_size=1, seq_len=len(tokens) + max_tokens,
                                      dtype=compute_dtype(device.type))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        with autocast_ctx(device.type):
            logits = model(ids, kv_cache=kv_cache)[:, -1, :]
        # 2) copy the cache into num_samples rows and decode one token per row per step
        kv_cache.expand_batch(num_samples)
        logits = logits.expand(num_samples, -1)
        done = [False] * num_samples
        for _ in range(max_tokens):
            next_ids = sample_next_token(logits, rng, temperature, top_k)  # (num_samples, 1)
            column = next_ids[:, 0].tolist()
            for i, t in enumerate(column):
                if t in stops:
                    done[i] = True
            yield column, [1] * num_samples
            if all(done):
                break
            with autocast_ctx(device.type):
                logits = model(next_ids, kv_cache=kv_cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """
        Non-streaming: returns (results, masks), one list per sample holding the prompt plus the
        generated tokens, without the stop token.
        """
        stops = chat_stop_ids(self.tokenizer)
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (t, m) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if t in stops:
                    done[i] = True
                else:
                    results[i].append(t)
                    masks[i].append(m)
            if all(done):
                break
        return results, masks
