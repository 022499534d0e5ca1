"""
The BPE tokenizer, nanochat style: trained with `rustbpe` (fast, parallel), used through `tiktoken`
(fast, batched encoding). Byte-level, so every string round-trips exactly.

Special tokens are appended after the learned merges and are never produced from plain text:
`encode` uses tiktoken's encode_ordinary, so the literal string "<|bos|>" in a document becomes
ordinary tokens, not the BOS id. Chats are turned into token ids (plus a loss mask) by
`render_conversation`.
"""
import copy
import os
import pickle

import torch

from nanochat.common import UserError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document begins with it (the loader packs BOS-separated documents)
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output (not predicted by the model)
]

# GPT-4's split pattern, except numbers split into chunks of at most 2 digits (\p{N}{1,2}, not {1,3}):
# nanochat found it wastes fewer tokens on numbers at small vocab sizes.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"


def _build_encoding(pattern, mergeable_ranks, special_tokens):
    import tiktoken
    return tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                             special_tokens=special_tokens)


class Tokenizer:
    """A tiktoken Encoding plus the chat conventions. Build with train_from_iterator or from_directory."""

    def __init__(self, pattern, mergeable_ranks, special_tokens):
        # keep the plain data so save() is a pickle of dicts/bytes, not of a tiktoken object
        self.pattern = pattern
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens)
        self.enc = _build_encoding(pattern, self.mergeable_ranks, self.special_tokens)
        self.bos_token_id = self.encode_special("<|bos|>")

    # ---------------------------------------------------------------- construction and storage
    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Train byte-level BPE on an iterator of strings. vocab_size includes the special tokens.
        The result may be smaller than asked when the text has too few distinct pairs to merge."""
        import rustbpe
        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise UserError(f"vocab size {vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)} "
                            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, n_merged, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(bpe.get_pattern(), mergeable_ranks, special_tokens)

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl and token_bytes.pt (bytes per token id, for bits-per-byte) into the dir."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        data = {"pattern": self.pattern, "mergeable_ranks": self.mergeable_ranks,
                "special_tokens": self.special_tokens}
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(data, f)
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written tokenizer
        torch.save(compute_token_bytes(self), os.path.join(tokenizer_dir, TOKEN_BYTES_FILE))
        return path

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise UserError(f"no tokenizer at {tokenizer_dir}: run `python -m scripts.tok_train` first")
        with open(path, "rb") as f:
            data = pickle.load(f)
        return cls(data["pattern"], data["mergeable_ranks"], data["special_tokens"])

    # ---------------------------------------------------------------- vocabulary
    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self.special_tokens)

    def encode_special(self, name):
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {sorted(self.special_tokens)}")
        return self.special_tokens[name]

    def get_bos_token_id(self):
        return self.bos_token_id

    def id_to_token(self, i):
        return self.enc.decode([i])

    # ---------------------------------------------------------------- encode / decode
    def _special_id(self, tok):
        return tok if isinstance(tok, int) else self.encode_special(tok)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int], or list[str] -> list[list[int]] (batched over threads).
        prepend/append: a special token name or an id, added to each sequence."""
        pre = self._special_id(prepend) if prepend is not None else None
        post = self._special_id(append) if append is not None else None
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        if isinstance(text, (list, tuple)):
            batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            if pre is not None:
                batch = [[pre] + ids for ids in batch]
            if post is not None:
                for ids in batch:
                    ids.append(post)
            return batch
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    # ---------------------------------------------------------------- chat rendering
    def render_conversation(self, conversation, max_tokens=2048):
        """
        Tokenize a chat: {"messages": [{"role": ..., "content": ...}, ...]} -> (ids, mask).
        mask[i] = 1 where the assistant produced token i (its text, its python calls, and its
        <|assistant_end|>); 0 for BOS, user turns, <|assistant_start|> and tool outputs, which are
        given, not predicted. A leading system message is merged into the first user message.
        Assistant content is a str, or a list of parts {"type": "text"|"python"|"python_output", "text": str}.
        """
        messages = conversation["messages"]
        if not messages:
            raise ValueError("conversation has no messages")
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            messages = copy.deepcopy(messages)
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        ids, mask = [], []

        def add(token_ids, m):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))

        sp = self.encode_special
        add(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {expected!r} "
                                 "(turns must alternate user/assistant, starting with user)")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError("user content must be a string")
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind, value = part["type"], self.encode(part["text"])
                    if kind == "text":
                        add(value, 1)
                    elif kind == "python":
                        add(sp("<|python_start|>"), 1)
                        add(value, 1)
                        add(sp("<|python_end|>"), 1)
                    elif kind == "python_output":
                        # the tool's output comes from python at inference time: not trained on
                        add(sp("<|output_start|>"), 0)
                        add(value, 0)
                        add(sp("<|output_end|>"), 0)
                    else:
                        raise ValueError(f"unknown content part type {kind!r}")
            else:
                raise ValueError(f"assistant content must be a str or a list of parts, got {type(content).__name__}")
            add(sp("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_turn(self, role, content):
        """Ids of one finished text message: <|role_start|> text <|role_end|> (role user or assistant)."""
        if role not in ("user", "assistant"):
            raise ValueError(f"role must be 'user' or 'assistant', got {role!r}")
        return [self.encode_special(f"<|{role}_start|>")] + self.encode(content) + \
            [self.encode_special(f"<|{role}_end|>")]

    def render_for_completion(self, conversation):
        """Ids that prime the model to answer: drop a final assistant message, end with <|assistant_start|>."""
        messages = copy.deepcopy(conversation["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("render_for_completion needs a conversation whose last turn (after dropping "
                             "a final assistant message) is from the user")
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=10**9)
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """A string with each token coloured: green = trained on (mask 1), red = context (mask 0)."""
        green, red, reset, gray = "\033[92m", "\033[91m", "\033[0m", "\033[90m"
        parts = []
        for i, (tok, m) in enumerate(zip(ids, mask)):
            text = self.id_to_token(tok)
            if with_token_id:
                text += f"{gray}({tok}){reset}"
            parts.append(f"{green if m == 1 else red}{text}{reset}")
        return "|".join(parts)


RustBPETokenizer = Tokenizer  # nanochat's name


def chat_stop_ids(tokenizer):
    """Token ids that end a reply: <|assistant_end|> and <|bos|> (only <|bos|> for a tokenizer without chat
    special tokens; none without a tokenizer)."""
    if tokenizer is None:
        return set()
    stops = {tokenizer.get_bos_token_id()}
    try:
        stops.add(tokenizer.encode_special("<|assistant_end|>"))
    except (ValueError, KeyError):
        pass
    return {s for s in stops if s is not None}


class StreamDecoder:
    """
    Incremental detokenizer: byte-level BPE can split one UTF-8 character over several tokens, so
    decoding token by token would print garbage. Text is released only once it decodes cleanly
    (no trailing replacement character); `flush` releases whatever is left at the end.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.emitted = 0  # characters of decode(ids) already released

    def feed(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self):
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def decode_stream(tokenizer, id_stream, stops=()):
    """The text of a stream of token ids, piece by piece, up to the first token in `stops` (left out)."""
    decoder = StreamDecoder(tokenizer)
    for t in id_stream:
        if t in stops:
            break
        piece = decoder.feed(t)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


def compute_token_bytes(tokenizer):
    """Long tensor (vocab,): UTF-8 bytes each token id stands for; 0 for special tokens, so they
    count for nothing in bits-per-byte."""
    special_ids = set(tokenizer.special_tokens.values())
    out = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.long)
    for i in range(tokenizer.get_vocab_size()):
        if i not in special_ids:
            out[i] = len(tokenizer.enc.decode_single_token_bytes(i))
    return out


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    """The tokenizer trained by scripts.tok_train, from $NANOCHAT_BASE_DIR/tokenizer."""
    return Tokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu"):
    """The (vocab,) long tensor of bytes per token id saved next to the tokenizer (for bits per byte)."""
    path = os.path.join(get_tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise UserError(f"no token_bytes at {path}: run `python -m scripts.tok_train` first")
    with open(path, "rb") as f:
        return torch.load(f, map_location=device)
