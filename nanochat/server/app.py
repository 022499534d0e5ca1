"""
create_app: the FastAPI app of scripts/chat_web.py (its docstring lists every route).

    app = create_app(model, tokenizer)            # a plain GPT (EngineChat): stateless
    app = create_app(chat=memory_chat)            # a MemoryChat: a persistent memory per conversation

Here: the page, /health, /v1/models, error handling in OpenAI's shape, and the middleware
(security.Guard, CORS when --cors-origin names origins). The chat route is in completions.py, the
conversations, documents and focus-map events in memory_routes.py.
"""
import os
import re
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException

from nanochat.common import get_base_dir
from nanochat.server import completions, memory_routes
from nanochat.server.conversations import ConversationMemories
from nanochat.server.errors import APIError, not_found
from nanochat.server.focus_map import FocusHub
from nanochat.server.scheduler import Scheduler
from nanochat.server.security import Guard
from nanochat.server.state import Server
from nanochat.server.validation import Defaults, Limits, check_defaults

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui.html")
DOCUMENTS = re.compile(r"/v1/conversations/[^/]+/documents")
MULTIPART_SLACK = 64 << 10  # a multipart body is the file plus boundaries and part headers


def create_app(model=None, tokenizer=None, *, chat=None, limits=None, defaults=None, source=None, memory_root=None,
               max_open_memories=16, max_concurrent=8, api_key=None, cors_origins=(), allowed_hosts=None,
               model_name=None, doc_chunk_tokens=8192):
    """
    Pass a model + tokenizer, or `chat`: any object with `prompt_ids(messages)` and `stream(messages,
    temperature=, top_k=, max_tokens=, seed=, prompt_ids=, on_notice=)` (EngineChat), or a MemoryChat
    (scripts.chat_cli): then every conversation_id gets a persistent memory in memory_root (default
    $NANOCHAT_BASE_DIR/chat_memory) built on the MemoryChat's nets. max_concurrent: requests answered at
    once (503 beyond). api_key: required as a Bearer token on every route but the page. cors_origins:
    other origins whose pages may call the API. allowed_hosts: Host names served (None: any).
    """
    from fastapi.middleware.cors import CORSMiddleware
    from scripts.chat_cli import EngineChat, MemoryChat

    if chat is None:
        if model is None or tokenizer is None:
            raise ValueError("create_app needs a model and a tokenizer, or a chat object")
        chat = EngineChat(model, tokenizer)
    limits, defaults = limits or Limits(), defaults or Defaults()
    check_defaults(limits, defaults)
    memories = None
    if isinstance(chat, MemoryChat):
        root = memory_root or os.path.join(get_base_dir(), "chat_memory")
        memories = ConversationMemories(chat.session, root, max_open_memories)
    server = Server(chat=chat, memories=memories, scheduler=Scheduler(max_concurrent), hub=FocusHub(),
                    limits=limits, defaults=defaults, model_name=model_name or f"nanochat-{source or 'model'}",
                    source=source, doc_chunk_tokens=doc_chunk_tokens)
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.memories = memories  # scripts.chat_web saves them at shutdown

    def body_limit(path):
        if DOCUMENTS.fullmatch(path):  # JSON escapes can double a text; the exact check is on the text itself
            return 2 * limits.max_document_bytes + MULTIPART_SLACK
        return limits.max_request_bytes
    app.add_middleware(Guard, api_key=api_key, cors_origins=cors_origins, allowed_hosts=allowed_hosts,
                       body_limit=body_limit)
    if cors_origins:  # outermost, so that even the Guard's errors carry CORS headers for those origins
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown routes and methods, in the same shape
        return APIError(str(e.detail), e.status_code, code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return APIError(f"bad request: {e.errors()[0].get('msg', e)}").response()

    @app.get("/", response_class=HTMLResponse)
    def index():
        with open(UI_PATH, encoding="utf-8") as f:
            return HTMLResponse(f.read(), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    def health():
        return {"status": "ok", "source": source, "model": server.model_name, "busy": server.scheduler.active > 0,
                "active": server.scheduler.active, "max_concurrent": server.scheduler.max_active,
                "memory": memories is not None,
                "limits": {"max_messages": limits.max_messages, "max_message_chars": limits.max_message_chars,
                           "max_total_tokens": limits.max_total_tokens, "max_max_tokens": limits.max_max_tokens,
                           "max_document_bytes": limits.max_document_bytes}}

    created = int(time.time())

    def model_object():
        return {"id": server.model_name, "object": "model", "created": created, "owned_by": "nanochat"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{name}")
    def get_model(name: str):
        if name != server.model_name:
            raise not_found(f"the model {name!r} does not exist; this server serves {server.model_name!r}",
                            "model_not_found")
        return model_object()

    app.include_router(completions.router)
    app.include_router(memory_routes.router)
    return app
