"""The ingress's HTTP guard: ASGI middleware in front of FastAPI (docs/serving.md, "Hostile input").

Its limits live in serving.common.INGRESS_LIMITS: Serve pickles the FastAPI app, and with it serving.app's
functions by value (their globals copied), so a dict there would not be the one the Ingress sets.
"""

import hmac

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from serving import common
from serving.schemas import BadJSON, strict_json


def key_refusal(key: str | None) -> tuple[int, str] | None:
    """(status, reason) when `key` is not the configured API key; None when it is."""
    expected = common.INGRESS_LIMITS.get("api_key")
    if not expected:
        return 503, "no API key configured on the server"
    if key is None or not hmac.compare_digest(key.encode("utf-8", "replace"), expected.encode()):
        return 401, "missing or wrong X-API-Key"
    return None


def _refuse(status: int, msg: str, field: str = "body") -> JSONResponse:
    headers = {"WWW-Authenticate": "ApiKey"} if status == 401 else None
    return JSONResponse({"detail": [{"loc": [field], "msg": msg, "type": "request"}]}, status, headers=headers)


def _is_json(content_type: str | None) -> bool:
    """No content type counts as JSON (as FastAPI reads it); else application/json or */*+json, in UTF-8."""
    if content_type is None:
        return True
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    charset = next((p.partition("=")[2].strip('" ') for p in params if p.startswith("charset=")), "utf-8")
    return (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))) \
        and charset == "utf-8"


class RequestGuard:
    """ASGI middleware run before FastAPI reads anything: POST /events without the right key is refused
    before its body is read; every body is read here counting the bytes that actually arrive (a chunked body
    has no Content-Length to trust) and refused with 413 past serving.max_body_bytes; a POST body must be
    strict JSON (serving.schemas.strict_json) or gets 400 (415 for another content type). Only then does the
    app see the body, replayed from memory."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = common.INGRESS_LIMITS["max_body_bytes"]
        refused = self._refused_unread(scope, limit)
        if refused is not None:
            return await _refuse(*refused)(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                return await _refuse(413, f"request body larger than {limit} bytes")(scope, receive, send)
            if not message.get("more_body"):
                break
        if body and scope["method"] == "POST":
            try:
                strict_json(bytes(body))
            except BadJSON as err:
                return await _refuse(400, str(err))(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    def _refused_unread(scope, limit: int) -> tuple[int, str, str] | None:
        """(status, reason, field) for a request refused on its headers alone."""
        headers, post = Headers(scope=scope), scope["method"] == "POST"
        route = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/")
        if post and route == "/events" and (refused := key_refusal(headers.get("x-api-key"))):
            return *refused, "X-API-Key"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return 413, f"request body larger than {limit} bytes", "body"
        if post and not _is_json(headers.get("content-type")):
            return 415, "content-type must be application/json (UTF-8)", "content-type"
        return None
