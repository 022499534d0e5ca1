"""
Chat with a trained model in the browser, or through OpenAI's API.

    python -m scripts.chat_web --source sft --port 8000     # then open http://127.0.0.1:8000
    python -m scripts.chat_web --api-key "$(openssl rand -hex 16)"   # every API call needs the key

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")   # any key when none is set
    client.chat.completions.create(model="nanochat-sft", messages=[{"role": "user", "content": "Hi"}],
                                   extra_body={"conversation_id": "notes-1"})   # the conversation's memory

Routes (the code is in nanochat/server/):
    GET    /                                  the chat page (nanochat/ui.html): chat, conversations, document
                                              upload, and the focus map of the memory
    GET    /health                            {"status": "ok", "memory": bool, "limits", ...}
    GET    /v1/models                         the one model served
    POST   /v1/chat/completions               OpenAI's chat completions, streaming or not; extra fields
                                              conversation_id and top_k (nanochat/server/completions.py)
    GET    /v1/conversations                  the conversations' memories; POST creates one
    GET    /v1/conversations/{id}             its statistics; DELETE removes it
    GET    /v1/conversations/{id}/focus       its focus map: the working context's entries, spans, levels
    GET    /v1/conversations/{id}/events      server-sent events: the focus map after every refocus
    POST   /v1/conversations/{id}/documents   a text file or pasted text into the memory, with progress events
                                              (nanochat/server/memory_routes.py)
Errors are OpenAI's error object {"error": {"message", "type", "param", "code"}}: 400 a bad request, 401
no or a wrong API key, 403 another site's page, 404 an unknown model or conversation, 409 a conversation in
use or a memory made by another model, 413 too large, 503 busy (with Retry-After).

Memory: when the checkpoint has MegaContext weights, each conversation_id ([A-Za-z0-9_-]{1,64}) gets a
persistent memory in $NANOCHAT_BASE_DIR/chat_memory/<id> (--memory-root), continued across restarts.
The memory holds the conversation, so a request may send the whole transcript or just the new message, and
a conversation may grow far past the window; --max-total-tokens limits what one request adds. A request
without a conversation_id is answered from a fresh in-RAM memory of its transcript. Without MegaContext
weights the server is stateless, and a transcript longer than the window keeps its most recent tokens.

Many conversations at once: each request runs in its own thread and takes the model one token at a time,
in arrival order, so replies in different conversations interleave; each conversation's memory has a lock
held for the whole turn. --max-concurrent requests run at once; one more gets 503 with Retry-After.

Security: binds 127.0.0.1 and answers only loopback Host names by default; requests from another site's page
are refused unless --cors-origin names it; with --api-key (or $NANOCHAT_API_KEY) every route but the page
needs `Authorization: Bearer KEY` (the page asks for it once per browser session).
"""
import argparse
import os

from nanochat.common import UserError, run_main
from nanochat.server.app import create_app
from nanochat.server.security import LOOPBACK_HOSTS
from nanochat.server.validation import Defaults, Limits, check_defaults

__all__ = ["create_app", "Defaults", "Limits", "build_parser", "main"]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scripts.chat_web",
                                description="Serve the chat page and an OpenAI-compatible API for a trained model, "
                                            "with a persistent MegaContext memory per conversation.")
    p.add_argument("--source", choices=["base", "mid", "sft"], default="sft", help="which checkpoints (default: sft)")
    p.add_argument("--model-tag", default=None, help="model tag, e.g. d20 (default: the largest one)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    p.add_argument("--memory-root", metavar="DIR", default=None,
                   help="where conversations' MegaContext memories live (default: $NANOCHAT_BASE_DIR/chat_memory); "
                        "used when the checkpoint has MegaContext weights")
    g = p.add_argument_group("network and security")
    g.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default: 127.0.0.1, this machine only; 0.0.0.0 serves the network: "
                        "set --api-key then)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but the page (default: "
                        "$NANOCHAT_API_KEY, else none)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="also let pages at ORIGIN (e.g. http://localhost:3000) call the API; repeatable "
                        "(default: only the server's own page)")
    g = p.add_argument_group("capacity")
    g.add_argument("--max-concurrent", type=int, default=8,
                   help="requests answered at once, their tokens interleaved; more get 503 (default: 8)")
    g.add_argument("--max-open-memories", type=int, default=16,
                   help="conversation memories kept open; idle ones beyond are saved and closed (default: 16)")
    g = p.add_argument_group("generation defaults (a request may override them within the limits)")
    g.add_argument("-t", "--temperature", type=float, default=Defaults.temperature)
    g.add_argument("-k", "--top-k", type=int, default=Defaults.top_k)
    g.add_argument("--max-tokens", type=int, default=Defaults.max_tokens)
    g = p.add_argument_group("request limits")
    g.add_argument("--max-messages", type=int, default=Limits.max_messages)
    g.add_argument("--max-message-chars", type=int, default=Limits.max_message_chars)
    g.add_argument("--max-total-tokens", type=int, default=Limits.max_total_tokens,
                   help="tokens one request may add to a memory (or a stateless prompt's length)")
    g.add_argument("--max-document-mb", type=float, default=Limits.max_document_bytes / 2**20,
                   help="largest document upload in MiB (default: %(default)s); larger ones get 413")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    limits = Limits(max_messages=args.max_messages, max_message_chars=args.max_message_chars,
                    max_total_tokens=args.max_total_tokens, max_document_bytes=int(args.max_document_mb * 2**20))
    defaults = Defaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    try:  # check the flags before the (slow) model load
        check_defaults(limits, defaults)
    except ValueError as e:
        raise UserError(f"bad generation default: {e} (see --help)") from None
    if args.max_concurrent < 1 or args.max_open_memories < 1:
        raise UserError("--max-concurrent and --max-open-memories must be >= 1")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty")
    import uvicorn
    from scripts.chat_cli import load_chat
    chat, _ = load_chat(args.source, args.model_tag, args.step, args.device_type)
    loopback = args.host in LOOPBACK_HOSTS
    app = create_app(chat=chat, limits=limits, defaults=defaults, source=args.source, memory_root=args.memory_root,
                     max_open_memories=args.max_open_memories, max_concurrent=args.max_concurrent,
                     api_key=args.api_key, cors_origins=args.cors_origin,
                     allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    memories = app.state.memories
    where = f", memories in {memories.root}" if memories is not None else ""
    key = ", API key required" if args.api_key else ""
    print(f"serving the {args.source} model at http://{args.host}:{args.port}{where}{key}", flush=True)
    try:
        # event streams stay open; give them a few seconds to end on Ctrl-C instead of waiting forever
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        if memories is not None:
            memories.close()  # save what is open (each turn was saved already)


if __name__ == "__main__":
    run_main(main)
