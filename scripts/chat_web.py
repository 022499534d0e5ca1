"""
Chat with a trained model in the browser.

    python -m scripts.chat_web --source sft --port 8000     # then open http://127.0.0.1:8000

Endpoints:
    GET  /                  the chat page (nanochat/ui.html)
    GET  /health            {"status": "ok", "memory": bool, ...}
    POST /chat/completions  {"messages": [{"role": "user", "content": "..."}, ...],
                             "conversation_id"?, "temperature"?, "top_k"?, "max_tokens"?}
                            -> server-sent events: `data: {"token": "..."}` per text piece,
                               then `data: {"done": true}` (or `data: {"error": "..."}`);
                               `data: {"notice": "..."}` may come first (e.g. a prompt cut to the window)
    GET  /memory/<conversation_id>   the conversation's memory statistics (MegaContext checkpoints)
Requests outside the limits are rejected with HTTP 400 and {"error": "<what is wrong>"}.

Memory: when the checkpoint has MegaContext weights, each conversation_id (the page keeps one in
localStorage; [A-Za-z0-9_-]{1,64}) gets a persistent memory in
$NANOCHAT_BASE_DIR/chat_memory/<conversation_id>, continued across server restarts. The memory holds
the conversation, so only messages it has not seen are read (a client may send the whole transcript
or just the new message) and a conversation may grow far past the window; max_total_tokens then
limits what one request adds. A request without a conversation_id is answered from a fresh in-RAM
memory of its transcript. Without MegaContext weights the server is stateless and a transcript
longer than the window keeps its most recent tokens (with a notice event).

The app comes from `create_app(model, tokenizer, ...)`, so tests serve a tiny random model with
FastAPI's TestClient. One model answers one request at a time (a lock): the GPU is the bottleneck,
and interleaving two KV-cache decodes on it would only slow both down. Each conversation's memory
also has its own lock, held for the whole turn, and no request touches a memory without it.
"""
import argparse
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from nanochat.common import UserError, get_base_dir, run_main

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")


@dataclass
class Limits:
    """What one request may ask for; anything outside is a 400 with a message naming the limit."""
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_tokens: int = 8192       # the rendered conversation (prompt) in tokens
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    min_top_k: int = 0                 # 0 = no top-k restriction
    max_top_k: int = 200
    min_max_tokens: int = 1
    max_max_tokens: int = 4096


@dataclass
class Defaults:
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


class RequestError(ValueError):
    """A request the client must fix (becomes HTTP 400 with {"error": message})."""


def _number(body, key, default, lo, hi, integer):
    value = body.get(key, default)
    if value is None:
        value = default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise RequestError(f"{key} must be {kind}, got {json.dumps(value)}")
    if not lo <= value <= hi:
        raise RequestError(f"{key} must be between {lo} and {hi}, got {value}")
    return int(value) if integer else float(value)


def validate_request(body, limits, defaults):
    """Check a /chat/completions body. Returns (messages, temperature, top_k, max_tokens)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role", "content"} objects')
    if len(messages) > limits.max_messages:
        raise RequestError(f"too many messages: {len(messages)} (the limit is {limits.max_messages})")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f'message {i} must be an object with string "role" and "content"')
        if m["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"message {i} has role {m['role']!r}; use 'system', 'user' or 'assistant'")
        if not m["content"].strip():
            raise RequestError(f"message {i} is empty")
        if len(m["content"]) > limits.max_message_chars:
            raise RequestError(f"message {i} is too long: {len(m['content'])} characters "
                               f"(the limit is {limits.max_message_chars})")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user":
        raise RequestError("the last message must be from the user")
    temperature = _number(body, "temperature", defaults.temperature, limits.min_temperature, limits.max_temperature, False)
    top_k = _number(body, "top_k", defaults.top_k, limits.min_top_k, limits.max_top_k, True)
    max_tokens = _number(body, "max_tokens", defaults.max_tokens, limits.min_max_tokens, limits.max_max_tokens, True)
    return clean, temperature, top_k, max_tokens


CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_conversation_id(body):
    """The request's conversation_id (None when absent). Strict, because it names a directory."""
    cid = body.get("conversation_id") if isinstance(body, dict) else None
    if cid is None:
        return None
    if not isinstance(cid, str) or not CONVERSATION_ID.fullmatch(cid):
        shown = json.dumps(cid)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise RequestError(f"conversation_id must be 1-64 characters from A-Z a-z 0-9 _ -, got {shown}")
    return cid


class ConversationMemories:
    """
    One persistent MemoryChat per conversation id, in root/<id>, all sharing the template session's
    nets. At most `max_open` stay open (least recently used ones are saved and closed when idle);
    a closed one is reopened from disk on its next request.
    """

    def __init__(self, template, root, max_open=16):
        self.template = template  # an MCSession whose GPT/GistNet/LensNet/config every memory uses
        self.root = root
        self.max_open = max_open
        self.chats = OrderedDict()  # id -> [MemoryChat, users]
        self.lock = threading.Lock()

    def path(self, cid):
        return os.path.join(self.root, cid)

    def acquire(self, cid):
        """The MemoryChat of `cid`, opened or created (SessionError for a memory it cannot use).
        Pair with release(cid): a chat in use is never closed."""
        from scripts.chat_cli import MemoryChat, fork_session
        with self.lock:
            entry = self.chats.get(cid)
            if entry is None:
                os.makedirs(self.root, exist_ok=True)
                entry = self.chats[cid] = [MemoryChat(fork_session(self.template, self.path(cid))), 0]
            self.chats.move_to_end(cid)
            entry[1] += 1
            idle = [k for k, (_, users) in self.chats.items() if users == 0]
            for k in idle[:max(0, len(self.chats) - self.max_open)]:
                self.chats.pop(k)[0].close()
            return entry[0]

    def release(self, cid):
        with self.lock:
            if cid in self.chats:
                self.chats[cid][1] -= 1

    def ephemeral(self):
        """A fresh in-RAM MemoryChat (for a request without a conversation_id)."""
        from scripts.chat_cli import MemoryChat, fork_session
        return MemoryChat(fork_session(self.template))

    def close(self):
        with self.lock:
            for chat, _ in self.chats.values():
                chat.close()
            self.chats.clear()


def sse(obj):
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj)}\n\n"


def create_app(model=None, tokenizer=None, *, chat=None, limits=None, defaults=None, source=None, memory_root=None,
               max_open_memories=16):
    """
    The FastAPI app. Pass a model + tokenizer, or `chat`: any object with `prompt_ids(messages)`
    and `stream(messages, temperature=, top_k=, max_tokens=, prompt_ids=, on_notice=)` (EngineChat),
    or a MemoryChat (scripts.chat_cli): then every conversation_id gets a persistent memory in
    memory_root (default $NANOCHAT_BASE_DIR/chat_memory) built on the MemoryChat's nets.
    """
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from megacontext.runtime import SessionError
    from scripts.chat_cli import EngineChat, MemoryChat

    if chat is None:
        if model is None or tokenizer is None:
            raise ValueError("create_app needs a model and a tokenizer, or a chat object")
        chat = EngineChat(model, tokenizer)
    memories = None
    if isinstance(chat, MemoryChat):
        root = memory_root or os.path.join(get_base_dir(), "chat_memory")
        memories = ConversationMemories(chat.session, root, max_open_memories)
    limits, defaults = limits or Limits(), defaults or Defaults()
    # the defaults fill in what a request leaves out, so they must themselves pass the limits
    validate_request({"messages": [{"role": "user", "content": "x"}]}, limits, defaults)
    lock = threading.Lock()
    app = FastAPI(title="nanochat")
    app.state.memories = memories
    # the page may be opened from another origin (e.g. an SSH-forwarded port); the API holds no secrets
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.get("/", response_class=HTMLResponse)
    def index():
        with open(UI_PATH, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    def health():
        return {"status": "ok", "source": source, "busy": lock.locked(), "memory": memories is not None,
                "limits": {"max_messages": limits.max_messages, "max_message_chars": limits.max_message_chars,
                           "max_total_tokens": limits.max_total_tokens, "max_max_tokens": limits.max_max_tokens}}

    def error(message, status=400):
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/memory/{conversation_id}")
    async def memory_stats(conversation_id: str):
        try:
            cid = validate_conversation_id({"conversation_id": conversation_id})
        except RequestError as e:
            return error(str(e))
        if memories is None:
            return error("this model has no MegaContext memory (its checkpoint was not trained with --mc)", 404)
        if not os.path.isdir(memories.path(cid)):
            return error(f"no memory for conversation {cid}", 404)

        def read():  # in a worker thread: the lock may be held by a turn that is still streaming
            conv = memories.acquire(cid)
            try:
                with conv.lock:
                    return conv.stats()
            finally:
                memories.release(cid)
        try:
            stats = await run_in_threadpool(read)
        except SessionError as e:
            return error(str(e), 409)
        stats.pop("memory_dir", None)  # a server path: not the client's business
        return {"conversation_id": cid, "stats": stats}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            try:
                body = await request.json()
            except ValueError:
                raise RequestError("the request body is not valid JSON") from None
            messages, temperature, top_k, max_tokens = validate_request(body, limits, defaults)
            cid = validate_conversation_id(body)
        except RequestError as e:
            return error(str(e))
        conv, release = chat, None
        if memories is not None:
            if cid is None:
                conv = memories.ephemeral()
            else:
                try:
                    conv = await run_in_threadpool(memories.acquire, cid)
                except SessionError as e:  # e.g. a memory made by another model: the server's state, not the request
                    return error(f"conversation {cid}: {e}", 409)
                release = lambda: memories.release(cid)  # noqa: E731
        try:
            try:
                prompt = conv.prompt_ids(messages)
            except ValueError as e:  # e.g. turns that do not alternate user/assistant
                raise RequestError(str(e)) from None
            if len(prompt) > limits.max_total_tokens:
                if memories is not None:
                    raise RequestError(f"this request adds {len(prompt)} tokens to the memory (the limit is "
                                       f"{limits.max_total_tokens}); send it in smaller messages")
                raise RequestError(f"the conversation is too long: {len(prompt)} tokens "
                                   f"(the limit is {limits.max_total_tokens}); start a new one")
        except RequestError as e:
            if release:
                release()
            return error(str(e))

        def events():
            # a plain generator: Starlette runs it in a worker thread, so the event loop stays free
            notices = []
            try:
                with lock:
                    try:
                        for piece in conv.stream(messages, temperature=temperature, top_k=top_k,
                                                 max_tokens=max_tokens, prompt_ids=prompt, on_notice=notices.append):
                            while notices:
                                yield sse({"notice": notices.pop(0)})
                            yield sse({"token": piece})
                        while notices:
                            yield sse({"notice": notices.pop(0)})
                    except Exception as e:  # the stream has started (200 sent): report in-band
                        yield sse({"error": f"generation failed: {type(e).__name__}: {e}"})
                        return
                yield sse({"done": True})
            finally:
                if release:
                    release()
                elif conv is not chat:
                    conv.close()  # an ephemeral in-RAM memory

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scripts.chat_web",
                                description="Serve a chat UI and a streaming chat API for a trained model.")
    p.add_argument("--source", choices=["base", "mid", "sft"], default="sft", help="which checkpoints (default: sft)")
    p.add_argument("--model-tag", default=None, help="model tag, e.g. d20 (default: the largest one)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 to serve the network (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    p.add_argument("--memory-root", metavar="DIR", default=None,
                   help="where conversations' MegaContext memories live (default: $NANOCHAT_BASE_DIR/chat_memory); "
                        "used when the checkpoint has MegaContext weights")
    g = p.add_argument_group("generation defaults (a request may override them within the limits)")
    g.add_argument("-t", "--temperature", type=float, default=Defaults.temperature)
    g.add_argument("-k", "--top-k", type=int, default=Defaults.top_k)
    g.add_argument("--max-tokens", type=int, default=Defaults.max_tokens)
    g = p.add_argument_group("request limits")
    g.add_argument("--max-messages", type=int, default=Limits.max_messages)
    g.add_argument("--max-message-chars", type=int, default=Limits.max_message_chars)
    g.add_argument("--max-total-tokens", type=int, default=Limits.max_total_tokens)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    limits = Limits(max_messages=args.max_messages, max_message_chars=args.max_message_chars,
                    max_total_tokens=args.max_total_tokens)
    defaults = Defaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    try:  # check the flags before the (slow) model load
        validate_request({"messages": [{"role": "user", "content": "x"}]}, limits, defaults)
    except RequestError as e:
        raise UserError(f"bad generation default: {e} (see --help)") from None
    import uvicorn
    from scripts.chat_cli import load_chat
    chat, _ = load_chat(args.source, args.model_tag, args.step, args.device_type)
    app = create_app(chat=chat, limits=limits, defaults=defaults, source=args.source, memory_root=args.memory_root)
    memory = f", memories in {app.state.memories.root}" if app.state.memories is not None else ""
    print(f"serving the {args.source} model at http://{args.host}:{args.port}{memory}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if app.state.memories is not None:
            app.state.memories.close()  # save what is open (each turn was saved already)


if __name__ == "__main__":
    run_main(main)
