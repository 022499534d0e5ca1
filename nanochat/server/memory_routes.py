"""
The conversations' memories (MegaContext checkpoints only; a plain model answers these with 404):

    GET    /v1/conversations                  {"object": "list", "data": [{"id", "updated"}]}, newest first
    POST   /v1/conversations                  {"id"?} -> 201 {"id", "object": "conversation", "stats"}
    GET    /v1/conversations/{id}             {"id", "object": "conversation", "stats"}
    DELETE /v1/conversations/{id}             {"id", "object": "conversation.deleted", "deleted": true}
    GET    /v1/conversations/{id}/focus       the focus map now (focus_map.snapshot)
    GET    /v1/conversations/{id}/events      server-sent events: the focus map now, then again after every
                                              refocus; {"type": "deleted"} when the conversation is deleted
    POST   /v1/conversations/{id}/documents   a text file (multipart field "file") or {"text", "name"?} as
                                              JSON -> server-sent events: {"type": "progress", "ingested",
                                              "total"} (tokens) ..., then {"type": "done", "messages", "stats"}
                                              or {"type": "error", "error": {...}}

A document goes into the memory as the CLI's /ingest puts it there (scripts.chat_cli.ingest_document):
a user turn pasting it and the assistant's acknowledgement; "messages" are those two, for a client that
keeps the transcript. The next question in the conversation is answered from the memory.
"""
import unicodedata
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from nanochat.server.errors import APIError, not_found
from nanochat.server.focus_map import snapshot
from nanochat.server.state import read_json, sse
from nanochat.server.turns import document_turn
from nanochat.server.validation import conversation_id

router = APIRouter()
KEEPALIVE_S = 15
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _server(request):
    server = request.app.state.server
    server.need_memory()
    return server


def _existing(server, cid):
    cid = conversation_id(cid, required=True)
    if not server.memories.exists(cid):
        raise not_found(f"no conversation {cid}", "conversation_not_found")
    return cid


def _public(stats):
    stats.pop("memory_dir", None)  # a server path: not the client's business
    return stats


def _read_map(server, cid):
    """Open the conversation (waiting for a running turn) and snapshot its focus map (in a worker thread)."""
    with server.memories.use(cid, server.scheduler.model_lock, create=False) as conv:
        event = snapshot(cid, conv)
    server.hub.publish(cid, event)
    return event


@router.get("/v1/conversations")
async def list_conversations(request: Request):
    server = _server(request)
    return {"object": "list", "data": await run_in_threadpool(server.memories.list)}


@router.post("/v1/conversations")
async def create_conversation(request: Request):
    server = _server(request)
    body = await read_json(request) if await request.body() else {}
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    cid = conversation_id(body.get("id"))
    cid, stats = await run_in_threadpool(server.memories.create, cid, server.scheduler.model_lock)
    return JSONResponse({"id": cid, "object": "conversation", "stats": _public(stats)}, status_code=201)


@router.get("/v1/conversations/{cid}")
async def get_conversation(cid: str, request: Request):
    server = _server(request)
    cid = _existing(server, cid)

    def read():
        with server.memories.use(cid, server.scheduler.model_lock, create=False) as conv:
            return conv.stats()
    return {"id": cid, "object": "conversation", "stats": _public(await run_in_threadpool(read))}


@router.delete("/v1/conversations/{cid}")
async def delete_conversation(cid: str, request: Request):
    server = _server(request)
    cid = conversation_id(cid, required=True)
    await run_in_threadpool(server.memories.delete, cid)
    server.hub.publish(cid, {"type": "deleted", "conversation_id": cid})
    return {"id": cid, "object": "conversation.deleted", "deleted": True}


@router.get("/v1/conversations/{cid}/focus")
async def focus(cid: str, request: Request):
    server = _server(request)
    cid = _existing(server, cid)
    return server.hub.latest(cid) or await run_in_threadpool(_read_map, server, cid)


@router.get("/v1/conversations/{cid}/events")
async def events(cid: str, request: Request):
    server = _server(request)
    cid = _existing(server, cid)
    listener = server.hub.listen(cid)

    async def stream():
        try:
            yield sse(server.hub.latest(cid) or await run_in_threadpool(_read_map, server, cid))
            while True:
                event = await listener.next(KEEPALIVE_S)
                if event is None:
                    yield ": keep-alive\n\n"  # a comment line: proxies and browsers keep the stream open
                    continue
                yield sse(event)
                if event["type"] == "deleted":
                    return
        finally:
            server.hub.forget(cid, listener)
    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


def clean_name(name):
    """A file name for the model to read (never a path on this server): its last part, printable, <= 100 chars."""
    if not isinstance(name, str):
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:100] or None


async def read_document(request, limits):
    """(text, name) of the upload: multipart field "file", or JSON {"text", "name"?}; 413 over the limit."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError('the upload has no file: send it as the multipart field "file"', param="file")
        data, name = await upload.read(), upload.filename
        await form.close()
    elif ctype.startswith("application/json"):
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise APIError('a JSON upload must be {"text": "...", "name"?: "..."}', param="text")
        data, name = body["text"].encode("utf-8"), body.get("name")
    else:
        raise APIError(f'send the document as multipart/form-data (field "file") or as JSON {{"text"}}, '
                       f'not {ctype or "no content type"}', 415, code="unsupported_media_type")
    if len(data) > limits.max_document_bytes:
        raise APIError(f"the document is {len(data)} bytes; the limit is {limits.max_document_bytes} bytes "
                       f"(the server's --max-document-mb)", 413, param="file", code="document_too_large")
    if b"\x00" in data:
        raise APIError("the file holds NUL bytes: it looks binary; upload a text file", param="file")
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise APIError("the document is empty: nothing to ingest", param="file")
    return text, clean_name(name)


def document_work(server, cid, text, name, emit, cancelled):
    """Read the document into the memory, in its own thread; the focus map follows every chunk."""
    lock = server.scheduler.model_lock
    with server.memories.use(cid, lock, create=False) as conv:
        def publish():
            server.hub.publish(cid, snapshot(cid, conv))
        try:
            document_turn(conv, text, name, lock, server.doc_chunk_tokens, emit, on_progress=publish)
        finally:
            publish()


@router.post("/v1/conversations/{cid}/documents")
async def upload_document(cid: str, request: Request):
    server = _server(request)
    cid = _existing(server, cid)
    text, name = await read_document(request, server.limits)
    run = server.scheduler.start(partial(document_work, server, cid, text, name))
    await run.started()

    async def stream():
        try:
            async for kind, *rest in run:
                if kind == "progress":
                    yield sse({"type": "progress", "ingested": rest[0], "total": rest[1]})
                elif kind == "document":
                    yield sse({"type": "done", "messages": rest[0], "stats": rest[1]})
                elif kind == "error":
                    yield sse({"type": "error", "error": rest[0].body()["error"]})
        finally:
            run.cancel()
    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
