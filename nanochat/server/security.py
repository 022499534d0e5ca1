"""
Security for a local research server, as one ASGI middleware that runs before any route:

- Host: when the server binds a loopback address, only requests addressed to a loopback name are served
  (a web page cannot reach it through a DNS name that resolves to 127.0.0.1: DNS rebinding).
- Origin: a browser sends its page's origin with every cross-site POST; a request from any origin other
  than the server's own (and those named by --cors-origin) is refused, so a page elsewhere cannot make the
  server ingest, generate or delete (plain form posts would otherwise reach it without CORS).
- API key: with --api-key, every route but the page itself ("/", which holds no data) needs
  `Authorization: Bearer KEY`; the page asks for the key once and keeps it in sessionStorage.
- Size: a body over the route's limit is refused with 413, by its Content-Length before it is read, or
  as soon as a chunked body passes the limit.
"""
import hmac
import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from nanochat.server.errors import APIError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class TooLarge(Exception):
    pass


def host_name(host):
    """The name part of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, app, api_key=None, cors_origins=(), allowed_hosts=None, body_limit=None, public=("/",)):
        self.app = app
        self.api_key = api_key
        self.cors_origins = set(cors_origins)
        self.allowed_hosts = set(allowed_hosts) if allowed_hosts else None
        self.body_limit = body_limit or (lambda path: 1 << 20)
        self.public = set(public)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            limit = self.check(scope)
        except APIError as e:
            return await self.reply(send, e)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, limited_receive, tracking_send)
        except TooLarge:
            if started:
                raise
            await self.reply(send, too_large(limit, scope["path"]))

    def check(self, scope):
        """The request's body limit, after the host, origin and key checks (APIError when one fails)."""
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            raise APIError(f"host {host!r} is not served here (use {sorted(self.allowed_hosts)[0]})", 403,
                           code="host_not_allowed")
        origin = headers.get("origin")
        # the page's own origin names the host it was loaded from (the scheme may differ behind a TLS proxy)
        if origin is not None and urlsplit(origin).netloc != host and origin not in self.cors_origins:
            raise APIError(f"requests from the page at {origin} are not allowed (the server's own page is; "
                           f"start it with --cors-origin {origin} to allow that one)", 403, code="origin_not_allowed")
        path = scope["path"]
        if self.api_key is not None and path not in self.public and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "a wrong API key" if given else "no API key"
                raise APIError(f"this server needs an API key (Authorization: Bearer KEY); the request has {what}",
                               401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        limit = self.body_limit(path)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large(limit, path, int(length))
        return limit

    @staticmethod
    async def reply(send, error):
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def too_large(limit, path, size=None):
    what = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return APIError(f"the request body is {what}; {path} accepts at most {limit} bytes", 413,
                    code="request_too_large")
