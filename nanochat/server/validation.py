"""
What one request may ask for, and the checks that turn a JSON body into a ChatRequest. Anything
outside the limits is a 400 whose message names the field and the limit, so a user can fix it.

The body is OpenAI's chat completion request: messages (content a string or a list of text parts;
"developer" is read as "system"), max_tokens (or max_completion_tokens), temperature, stop, seed, n=1,
stream, stream_options.include_usage; plus two fields of ours, top_k and conversation_id (OpenAI's
client sends them through extra_body). Other OpenAI fields (top_p, penalties, user, ...) are accepted and
ignored, so clients that always send them still work.
"""
import json
import re
from dataclasses import dataclass

from nanochat.server.errors import APIError


@dataclass
class Limits:
    """What one request may ask for; anything outside is a 400 (413 for sizes) naming the limit."""
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_tokens: int = 8192       # the prompt in tokens (with a memory: what one request adds to it)
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    min_top_k: int = 0                 # 0 = no top-k restriction
    max_top_k: int = 200
    min_max_tokens: int = 1
    max_max_tokens: int = 4096
    max_stop: int = 4                  # stop strings, as OpenAI allows
    max_request_bytes: int = 4 << 20   # a JSON body (413 beyond)
    max_document_bytes: int = 8 << 20  # one uploaded document, as UTF-8 (413 beyond)


@dataclass
class Defaults:
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


@dataclass
class ChatRequest:
    messages: list
    temperature: float
    top_k: int
    max_tokens: int
    stop: list
    seed: object            # int or None (a fresh seed)
    stream: bool
    include_usage: bool
    model: object           # str or None (the served model)
    conversation_id: object  # str or None (stateless)


def _number(body, key, default, lo, hi, integer):
    value = body.get(key, default)
    if value is None:
        value = default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise APIError(f"{key} must be {kind}, got {_shown(value)}", param=key)
    if not lo <= value <= hi:
        raise APIError(f"{key} must be between {lo} and {hi}, got {value}", param=key)
    return int(value) if integer else float(value)


def _shown(value, width=80):
    s = json.dumps(value)
    return s if len(s) <= width else s[:width - 3] + "..."


def _content(m, i):
    """A message's text: a string, or OpenAI's list of content parts of which only text is understood."""
    c = m.get("content")
    if isinstance(c, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise APIError(f"message {i}: only text content parts are supported", param="messages")
        return "".join(p["text"] for p in c)
    return c


def check_messages(messages, limits):
    if not isinstance(messages, list) or not messages:
        raise APIError('"messages" must be a non-empty list of {"role", "content"} objects', param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(f"too many messages: {len(messages)} (the limit is {limits.max_messages})", param="messages")
    clean = []
    for i, m in enumerate(messages):
        content = _content(m, i) if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(f'message {i} must be an object with string "role" and "content"', param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise APIError(f"message {i} has role {m['role']!r}; use 'system', 'user' or 'assistant'",
                           param="messages")
        if not content.strip():
            raise APIError(f"message {i} is empty", param="messages")
        if len(content) > limits.max_message_chars:
            raise APIError(f"message {i} is too long: {len(content)} characters "
                           f"(the limit is {limits.max_message_chars})", param="messages")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "user":
        raise APIError("the last message must be from the user", param="messages")
    return clean


def _stop(body, limits):
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > limits.max_stop:
        raise APIError(f"stop must be a non-empty string or a list of at most {limits.max_stop} of them, "
                       f"got {_shown(body.get('stop'))}", param="stop")
    return stop


def parse_chat_request(body, limits, defaults):
    """Check a /v1/chat/completions body (APIError 400 naming what is wrong)."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    messages = check_messages(body.get("messages"), limits)
    if body.get("n", 1) not in (1, None):
        raise APIError(f"only n=1 is supported, got {_shown(body.get('n'))}", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, defaults.max_tokens, limits.min_max_tokens, limits.max_max_tokens, True)
    temperature = _number(body, "temperature", defaults.temperature, limits.min_temperature,
                          limits.max_temperature, False)
    top_k = _number(body, "top_k", defaults.top_k, limits.min_top_k, limits.max_top_k, True)
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", 0, 0, 2**63 - 1, True)
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError("stream must be true or false and stream_options an object", param="stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(f"model must be a string, got {_shown(model)}", param="model")
    return ChatRequest(messages, temperature, top_k, max_tokens, _stop(body, limits), seed, stream,
                       bool(options.get("include_usage")), model, conversation_id(body.get("conversation_id")))


CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def conversation_id(cid, required=False):
    """A validated conversation id (None when absent and not required). Strict: it names a directory."""
    if cid is None and not required:
        return None
    if not isinstance(cid, str) or not CONVERSATION_ID.fullmatch(cid):
        raise APIError(f"conversation_id must be 1-64 characters from A-Z a-z 0-9 _ -, got {_shown(cid)}",
                       param="conversation_id", code="invalid_conversation_id")
    return cid


def check_defaults(limits, defaults):
    """The defaults fill in what a request leaves out, so they must themselves pass the limits."""
    try:
        parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, limits, defaults)
    except APIError as e:
        raise ValueError(e.message) from None
