"""
The work of one request, run in its own thread (scheduler.Run) and told as events:

    ("ready", prompt_tokens)            the request is valid and generation starts (the HTTP status is now 200)
    ("notice", text)                    e.g. a prompt cut to the window (a chat without memory)
    ("text", piece)                     reply text, already cut at a stop string
    ("end", finish_reason, usage)       "stop" or "length", {"prompt_tokens", "completion_tokens", "total_tokens"}
    ("progress", done, total)           a document: tokens ingested so far
    ("document", messages, stats)       a document is in the memory

Anything that fails before "ready" is the request's fault (an APIError, sent as the HTTP error); after it,
the error is reported in the stream. Every use of the nets is one step under the model lock.

Usage is exact for a MemoryChat (read from the memory: the tokens the reply added, its closing
<|assistant_end|> included) and for an EngineChat (its engine's steps are counted); for any other chat
object (tests' doubles) it is the re-encoded text.
"""
import copy

from nanochat.server.errors import APIError
from nanochat.tokenizer import chat_stop_ids


class StopStrings:
    """Cuts streamed text at the first stop string, holding back only a tail that could start one."""

    def __init__(self, stops):
        self.stops = stops
        self.held = ""

    def feed(self, piece):
        """(text to release, whether a stop string was found)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self):
        text, self.held = self.held, ""
        return text


class _CountingEngine:
    """An Engine whose generate() counts the steps it yields and whether a stop token came (EngineChat's usage)."""

    def __init__(self, engine, stops):
        self.engine, self.stops = engine, stops
        self.prompt_tokens = self.steps = 0
        self.stopped = False

    def generate(self, tokens, **kw):
        self.prompt_tokens = len(tokens)  # after EngineChat cut it to the window
        for column, masks in self.engine.generate(tokens, **kw):
            self.steps += 1
            self.stopped = self.stopped or column[0] in self.stops
            yield column, masks


class Meter:
    """Counts a reply's tokens and tells how it ended. wrap() gives the chat to stream from."""

    def __init__(self, conv, prompt, max_tokens):
        self.conv, self.prompt, self.max_tokens = conv, prompt, max_tokens
        self.memory = getattr(conv, "session", None)
        self.stops = chat_stop_ids(getattr(conv, "tokenizer", None))
        self.engine = None
        if self.memory is not None:
            self.start = self.memory.num_tokens + len(prompt)  # where the reply begins in the memory
        elif hasattr(conv, "engine"):  # an EngineChat: count its engine's steps, on a copy of it for this request
            self.engine = _CountingEngine(conv.engine, self.stops)
            self.conv = copy.copy(conv)
            self.conv.engine = self.engine

    def result(self, text):
        """(prompt_tokens, completion_tokens, stopped_by_the_model)."""
        if self.memory is not None:
            reply = self.memory.tree.tokens(self.start, self.memory.num_tokens).tolist()
            first_stop = next((i for i, t in enumerate(reply) if t in self.stops), len(reply))
            return len(self.prompt), min(len(reply), self.max_tokens), first_stop < self.max_tokens
        if self.engine is not None:
            return self.engine.prompt_tokens, self.engine.steps, self.engine.stopped
        tok = getattr(self.conv, "tokenizer", None)
        n = len(tok.encode(text)) if tok is not None else len(text.split())
        return len(self.prompt), n, n < self.max_tokens


def chat_turn(conv, req, limits, model_lock, emit, cancelled, stateful, on_step=None):
    """Answer req (validation.ChatRequest) from `conv` (EngineChat or MemoryChat), telling events through emit."""
    try:
        prompt = conv.prompt_ids(req.messages)
    except ValueError as e:  # e.g. turns that do not alternate user/assistant
        raise APIError(str(e), param="messages") from None
    if len(prompt) > limits.max_total_tokens:
        if stateful:
            raise APIError(f"this request adds {len(prompt)} tokens to the memory (the limit is "
                           f"{limits.max_total_tokens}); send it in smaller messages", param="messages",
                           code="context_length_exceeded")
        raise APIError(f"the conversation is too long: {len(prompt)} tokens (the limit is "
                       f"{limits.max_total_tokens}); start a new one", param="messages", code="context_length_exceeded")
    meter = Meter(conv, prompt, req.max_tokens)
    emit(("ready", len(prompt)))
    notices, pieces, stopper, cut = [], [], StopStrings(req.stop), False
    stream = meter.conv.stream(req.messages, temperature=req.temperature, top_k=req.top_k, max_tokens=req.max_tokens,
                               seed=req.seed, prompt_ids=prompt, on_notice=notices.append)
    try:
        while not cancelled.is_set():
            with model_lock:  # one step: a token (the first also reads the prompt into the memory)
                piece = next(stream, None)
            while notices:
                emit(("notice", notices.pop(0)))
            text, cut = stopper.feed(piece) if piece is not None else (stopper.flush(), False)
            if text:
                pieces.append(text)
                emit(("text", text))
            if on_step is not None:
                on_step()
            if piece is None or cut:
                break
    finally:
        with model_lock:  # a MemoryChat closes the turn and saves, even when the reply was cut short
            stream.close()
    prompt_tokens, completion_tokens, stopped = meter.result("".join(pieces))
    finish = "stop" if cut or stopped else "length"
    emit(("end", finish, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}))


def document_turn(conv, text, name, model_lock, chunk_tokens, emit, on_progress=None):
    """Read a document into a MemoryChat (scripts.chat_cli.ingest_document, as the CLI's /ingest does)."""
    from scripts.chat_cli import ingest_document

    def progress(done, total):
        emit(("progress", done, total))
        if on_progress is not None:
            on_progress()
    emit(("ready", 0))
    messages = ingest_document(conv, text, name, on_progress=progress, step_lock=model_lock, chunk_tokens=chunk_tokens)
    stats = conv.stats()
    stats.pop("memory_dir", None)  # a server path: not the client's business
    emit(("document", messages, stats))
