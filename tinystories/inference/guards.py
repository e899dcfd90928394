"""What stands between the network and the server's routes: the API key, the request body's size and encoding,
error bodies that always render, and the warning printed when the server is reachable from other machines.

    app.add_middleware(BodyGuard, limit=64 * 1024)      # 413 over the limit, 400 for a body that is not UTF-8
    app.add_middleware(ApiKey, key="...")              # 401 on /v1/... without `Authorization: Bearer KEY`
    install_error_handlers(app)                         # 422s that render NaN and lone surrogates
    document_api_key(app)                               # the bearer scheme in /openapi.json (Swagger's Authorize)
    exposure_warning("0.0.0.0", 8000, None)            # "warning: serving on 0.0.0.0:8000 without --api-key: ..."

The key protects the API, every path under /v1/ (ours and the OpenAI-compatible one), as vLLM's and llama.cpp's
servers do. It is required everywhere except on a short list of open paths (default deny): /health, the
playground page and its static files, the schema and its docs, so that the page can load and ask for the key.
Keys are compared in constant time (hmac.compare_digest).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math

API_KEY_ENV = "TINYSTORIES_API_KEY"
PROTECTED_PREFIX = "/v1/"  # the API: what the schema marks as needing the key
OPEN_PATHS = frozenset({"/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
OPEN_PREFIXES = ("/static/",)
OPENAI_PATHS = ("/v1/completions", "/v1/models")  # their errors follow OpenAI's shape ({"error": {...}})


# ------------------------------------------------------------------------------------------------ middleware


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A whole JSON response over ASGI `send`; the connection closes after it (the request was not read)."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": payload})


def error_body(path: str, msg: str, kind: str, code: str) -> dict:
    """An error in the protocol of the route asked for: OpenAI's {"error": {...}} or our {"detail": ...}."""
    if path.startswith(OPENAI_PATHS):
        return {"error": {"message": msg, "type": kind, "code": code}}
    return {"detail": msg}


class ApiKey:
    """Pure ASGI middleware: every request but those to OPEN_PATHS needs `Authorization: Bearer KEY` (401
    otherwise); CORS preflights (OPTIONS) pass, the CORS middleware outside answers them."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope["method"] == "OPTIONS" or path in OPEN_PATHS
                or path.startswith(OPEN_PREFIXES)):
            return await self.app(scope, receive, send)
        problem = self.check(dict(scope.get("headers") or []).get(b"authorization"))
        if problem is None:
            return await self.app(scope, receive, send)
        msg = (f"{problem}: this server requires an API key; send the header 'Authorization: Bearer KEY' "
               "(ask whoever runs the server for the key)")
        await send_json(send, 401, error_body(scope["path"], msg, "invalid_request_error", "invalid_api_key"),
                        [(b"www-authenticate", b'Bearer realm="tinystories"')])

    def check(self, header: bytes | None) -> str | None:
        """None when `header` carries the key, else what is wrong with it."""
        if not header:
            return "no API key"
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "the Authorization header is not 'Bearer KEY'"
        if not hmac.compare_digest(token.strip(), self.key):
            return "wrong API key"
        return None


class BodyGuard:
    """Pure ASGI middleware: a request body over `limit` bytes gets 413 (Content-Length or counted); a JSON body
    that is not UTF-8 gets 400, naming the first bad byte (JSON text is UTF-8: RFC 8259)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(send, path)
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(msg.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await self._too_large(send, path)
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            msg = (f"the request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}): "
                   "send JSON encoded as UTF-8")
            return await send_json(send, 400, error_body(path, msg, "invalid_request_error", "invalid_encoding"))

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, path: str) -> None:
        msg = f"request body too large (limit {self.limit:,} bytes)"
        await send_json(send, 413, error_body(path, msg, "invalid_request_error", "body_too_large"))


# ------------------------------------------------------------------------------------------------ errors


def install_error_handlers(app) -> None:
    """422 validation errors whose body always renders: FastAPI echoes the offending input, which may be NaN or
    Infinity (JSON has no such numbers) or a string with a lone surrogate (not encodable as UTF-8)."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse({"detail": renderable(jsonable_encoder(exc.errors()))}, status_code=422)

    app.add_exception_handler(RequestValidationError, validation_error)


def renderable(value):
    """`value` with non-finite floats as strings ("nan", "inf") and lone surrogates escaped ("\\ud800")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {renderable(k): renderable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [renderable(v) for v in value]
    return value


def document_api_key(app) -> None:
    """Declare the bearer key in the OpenAPI schema for every /v1/ operation, with its 401 answer."""
    build = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": f"--api-key or ${API_KEY_ENV}"}}
        for path, ops in schema.get("paths", {}).items():
            if path.startswith(PROTECTED_PREFIX):
                for op in ops.values():
                    op["security"] = [{"apiKey": []}]
                    op.setdefault("responses", {})["401"] = {"description": "no API key, or a wrong one"}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# ------------------------------------------------------------------------------------------------ exposure


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """What to tell the person starting a server that other machines can reach; None on loopback."""
    if is_loopback(host):
        return None
    shown = f"[{host}]" if ":" in host else host
    everyone = host in ("0.0.0.0", "::", "")
    who = (f"anyone who can reach this machine on port {port}" if everyone
           else f"anyone who can reach {host} on port {port}")
    if api_key:
        return (f"note: serving on {shown}:{port}: {who} can load the page; the API needs the key. The traffic is "
                "plain HTTP: over an untrusted network put a TLS proxy in front")
    return (f"warning: serving on {shown}:{port} without --api-key: {who} can use it "
            f"(set --api-key KEY or ${API_KEY_ENV} to require a key)")


def resolve_api_key(flag: str | None, environ) -> str | None:
    """The key from --api-key, else $TINYSTORIES_API_KEY (unset or empty: no key). A UserError for a key
    that cannot be sent in an HTTP header."""
    from tinystories.core.errors import UserError

    key, source = (flag, "--api-key") if flag is not None else (environ.get(API_KEY_ENV) or None, f"${API_KEY_ENV}")
    if key is None:
        return None
    if not key.strip() or key != key.strip() or not key.isprintable() or not key.isascii():
        raise UserError(f"{source}: the key must be non-empty printable ASCII without spaces at either end "
                        "(it travels in an HTTP header)")
    return key
