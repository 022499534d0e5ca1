"""
POST /v1/chat/completions, OpenAI's chat API (validation.py lists the fields understood).

    {"model": "nanochat-sft", "messages": [...], "stream": true, "conversation_id": "notes-1"}

Without stream: one `chat.completion` object. With it: `chat.completion.chunk` events (the first carries
the role, then content deltas, then an empty delta with finish_reason; with
stream_options.include_usage a last chunk with no choices and the usage), then `data: [DONE]`. A
failure after the stream has started arrives as an event holding an error object (the openai client
raises it). A chunk with no choices may carry a `notice` (e.g. a prompt cut to a plain model's window).

conversation_id picks the conversation's persistent memory (created on first use); the memory holds
the conversation, so only messages it has not seen are read (send the whole transcript or just the new
message) and usage.prompt_tokens counts what this request added to it. Without conversation_id the
request is stateless: a fresh in-RAM memory of the transcript, dropped afterwards.
finish_reason is "stop" at <|assistant_end|> or a stop string, "length" at max_tokens.
"""
import secrets
import time
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from nanochat.server.errors import APIError, not_found
from nanochat.server.focus_map import snapshot
from nanochat.server.state import read_json, sse
from nanochat.server.turns import chat_turn
from nanochat.server.validation import parse_chat_request

router = APIRouter()


def work(server, req, emit, cancelled):
    """One chat turn, in its own thread (scheduler.Run)."""
    lock, limits = server.scheduler.model_lock, server.limits
    if server.memories is None:
        return chat_turn(server.chat, req, limits, lock, emit, cancelled, stateful=False)
    cid = req.conversation_id
    if cid is None:
        conv = server.memories.ephemeral()
        try:
            return chat_turn(conv, req, limits, lock, emit, cancelled, stateful=True)
        finally:
            conv.close()
    with server.memories.use(cid, lock) as conv:
        seen = [None]

        def publish_on_refocus():  # the page's focus map follows every refocus
            if conv.session.refocus_count != seen[0]:
                seen[0] = conv.session.refocus_count
                server.hub.publish(cid, snapshot(cid, conv))
        try:
            chat_turn(conv, req, limits, lock, emit, cancelled, stateful=True, on_step=publish_on_refocus)
        finally:
            server.hub.publish(cid, snapshot(cid, conv))


def response(base, kind, **fields):
    """An OpenAI response object: id and object first, as OpenAI orders them."""
    return {"id": base["id"], "object": kind, "created": base["created"], "model": base["model"],
            "system_fingerprint": None, **fields}


def chunk(base, delta=None, finish=None, **extra):
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return response(base, "chat.completion.chunk", choices=choices, **extra)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    server = request.app.state.server
    req = parse_chat_request(await read_json(request), server.limits, server.defaults)
    if req.model is not None and req.model != server.model_name:
        raise not_found(f"the model {req.model!r} does not exist; this server serves {server.model_name!r}",
                        "model_not_found")
    run = server.scheduler.start(partial(work, server, req))
    await run.started()
    base = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": server.model_name}
    if not req.stream:
        return await collect(run, base, req)

    async def events():
        try:
            yield sse(chunk(base, {"role": "assistant", "content": ""}))
            async for kind, *rest in run:
                if kind == "text":
                    yield sse(chunk(base, {"content": rest[0]}))
                elif kind == "notice":
                    yield sse(chunk(base, notice=rest[0]))
                elif kind == "end":
                    yield sse(chunk(base, {}, rest[0]))
                    if req.include_usage:
                        yield sse(chunk(base, usage=rest[1]))
                elif kind == "error":
                    yield sse(rest[0].body())
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()  # the client went away: the turn stops at its next token (and is closed in the memory)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def collect(run, base, req):
    """The non-streaming answer: wait for the whole reply."""
    pieces, notices, finish, usage = [], [], None, None
    try:
        async for kind, *rest in run:
            if kind == "text":
                pieces.append(rest[0])
            elif kind == "notice":
                notices.append(rest[0])
            elif kind == "end":
                finish, usage = rest
            elif kind == "error":
                raise rest[0]
    finally:
        run.cancel()
    if finish is None:
        raise APIError("the reply was not finished", 500)
    message = {"role": "assistant", "content": "".join(pieces)}
    out = response(base, "chat.completion", choices=[{"index": 0, "message": message, "finish_reason": finish,
                                                      "logprobs": None}], usage=usage,
                   conversation_id=req.conversation_id)
    if notices:
        out["notices"] = notices
    return out
