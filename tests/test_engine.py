"""
The inference engine: sampling rules, KV-cached generation equal to a naive full-forward greedy
loop, several samples from one prefill, and stopping at <|assistant_end|> / <|bos|>.
"""
import pytest
import torch

from nanochat.engine import Engine, sample_next_token
from nanochat.gpt import GPT, GPTConfig

V = 97


def tiny_gpt(vocab=V, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # the zero-initialised output projections would make the blocks no-ops
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.02)
        model.smear.uniform_(-0.5, 0.5)  # the smear starts at 0: a non-zero gate tests its cache path
    return model.eval()


class FakeTokenizer:
    """Just what the engine asks for: the BOS id and the <|assistant_end|> id."""

    def __init__(self, bos, assistant_end):
        self.bos, self.end = bos, assistant_end

    def get_bos_token_id(self):
        return self.bos

    def encode_special(self, name):
        assert name == "<|assistant_end|>"
        return self.end


def naive_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_sample_next_token_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    rng = torch.Generator().manual_seed(0)
    greedy = sample_next_token(logits, rng, temperature=0.0)
    assert greedy.shape == (4, 1) and torch.equal(greedy[:, 0], logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, rng, temperature=1.0, top_k=1), greedy)
    # top-k: every draw is among the k best of its row
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        s = sample_next_token(logits, rng, temperature=2.0, top_k=3)
        assert (s == top3).any(dim=-1).all()
    # the same seed gives the same draws
    a = sample_next_token(logits, torch.Generator().manual_seed(5), temperature=1.0)
    b = sample_next_token(logits, torch.Generator().manual_seed(5), temperature=1.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_next_token(logits, rng, temperature=-1.0)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    rng = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next_token(logits, rng, temperature=1.0) for _ in range(3000)])
    freq = torch.bincount(draws[:, 0], minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_greedy_generation_matches_full_forward_loop():
    model = tiny_gpt(vocab=V)
    prompt = [5, 17, 3, 88, 41, 2]
    expected = naive_greedy(model, prompt, 12)
    engine = Engine(model, tokenizer=None)  # no stop tokens
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=12, temperature=0.0))
    assert len(columns) == 12
    for column, masks in columns:
        assert len(column) == 3 and masks == [1, 1, 1]
    for row in range(3):  # every sample of the expanded cache decodes the same greedy sequence
        assert [c[row] for c, _ in columns] == expected
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0)
    assert results == [prompt + expected] * 2
    assert masks == [[0] * len(prompt) + [1] * 12] * 2


def test_sampled_generation_is_seeded_and_rows_differ():
    model = tiny_gpt(vocab=V)
    with torch.no_grad():  # flatten the distribution so samples differ between rows
        model.lm_head.weight.mul_(0.0)
    engine = Engine(model, tokenizer=None)
    a, _ = engine.generate_batch([1, 2, 3], num_samples=4, max_tokens=10, temperature=1.0, seed=7)
    b, _ = engine.generate_batch([1, 2, 3], num_samples=4, max_tokens=10, temperature=1.0, seed=7)
    c, _ = engine.generate_batch([1, 2, 3], num_samples=4, max_tokens=10, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1


@pytest.mark.parametrize("which", ["assistant_end", "bos"])
def test_generation_stops_at_stop_tokens(which):
    model = tiny_gpt(vocab=V)
    prompt = [5, 17, 3, 88, 41, 2]
    free = naive_greedy(model, prompt, 12)
    stop = free[3]
    cut = free.index(stop)  # the first time the stop token would be produced
    other = next(t for t in range(V) if t not in free)
    tok = FakeTokenizer(bos=stop, assistant_end=other) if which == "bos" else FakeTokenizer(bos=other, assistant_end=stop)
    engine = Engine(model, tok)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0)
    assert results == [prompt + free[:cut]] * 2  # the stop token itself is not returned
    assert len(masks[0]) == len(results[0])
    steps = list(engine.generate(prompt, max_tokens=12, temperature=0.0))
    assert len(steps) == cut + 1 and steps[-1][0] == [stop]  # the stream yields it, then ends


def test_generate_rejects_bad_prompt():
    engine = Engine(tiny_gpt(vocab=V), tokenizer=None)
    with pytest.raises(ValueError):
        list(engine.generate([], max_tokens=2))
