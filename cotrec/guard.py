"""The Serve app's front door: API keys, the body limit, the request timeout and error replies that
say nothing about the server, as one ASGI middleware (`Guard`) that wraps any ASGI app.

Per HTTP request, in this order:
- a request id: the one Serve's proxy gave the request (its `x-request-id` header, which the
  proxy also puts on the reply), else a new one added to the reply as `x-request-id`; a 500's
  body holds only that id, and the log line beside the traceback names it;
- the key: every path but `Policy.open_paths` (the bare liveness probe) needs `Authorization:
  Bearer <key>` with one of the policy's keys, compared in constant time; otherwise 401 with
  `WWW-Authenticate: Bearer`, the same reply for a missing and a wrong key. A policy with no keys
  admits everyone: `cotrec serve` allows that only on a loopback address, a deployment only
  when its args say `allow_unauthenticated: true`;
- the body: at most `max_body_bytes`, counted as the bytes arrive (a chunked body has no
  Content-Length to trust), 413 as soon as it is past the limit;
- the time: past `timeout_s` the request is cancelled and answered 504;
- an exception: logged with the request id and its traceback, answered 500 with the request id.

`load_api_keys` reads keys from a file (one a line, `#` comments; a mounted Secret) and/or an
environment variable (separated by commas, spaces or newlines).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from fastapi import HTTPException

from cotrec.errors import CotrecError

MIN_KEY_CHARS = 16
KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a header carries unchanged
REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID = re.compile(rb"[\w.-]{1,128}")  # a proxy's id; anything else is not written to the log
LOG = logging.getLogger("ray.serve")  # a Serve replica's log, beside Serve's own request lines


def _digest(secret: Union[str, bytes]) -> bytes:
    # equal lengths for every comparison: compare_digest alone returns early on a length mismatch
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def parse_keys(text: str, where: str) -> tuple[str, ...]:
    """The keys in a file's or a variable's text; a malformed key is an error naming its line,
    never its value."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for key in line.replace(",", " ").split():
            if not KEY_CHARS.fullmatch(key) or len(key) < MIN_KEY_CHARS:
                raise CotrecError(f"{where}, line {number}: an API key must be at least {MIN_KEY_CHARS} visible "
                                  f"ASCII characters (e.g. `openssl rand -hex 32`)")
            keys.append(key)
    return tuple(dict.fromkeys(keys))


def load_api_keys(file: Optional[str] = None, env: Optional[str] = None) -> tuple[str, ...]:
    """The API keys from `file` and the environment variable `env` (either may be None)."""
    keys: list[str] = []
    if file:
        path = Path(file).expanduser()
        try:
            keys += parse_keys(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError:
            raise CotrecError(f"{path}: no such API key file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CotrecError(f"{path}: cannot read the API key file ({type(exc).__name__})") from None
        if not keys:
            raise CotrecError(f"{path}: no API key in it (one a line)")
    if env:
        if not os.environ.get(env, "").strip():
            raise CotrecError(f"${env}: the environment variable named for API keys is not set or empty")
        keys += parse_keys(os.environ[env], f"${env}")
    return tuple(dict.fromkeys(keys))


@dataclass(frozen=True)
class Policy:
    """What `Guard` enforces. No keys: no authentication (see the module's docstring)."""

    keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    timeout_s: float = 60.0
    open_paths: frozenset[str] = frozenset({"/healthz"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "_digests", tuple(_digest(k) for k in self.keys))

    def admits(self, authorization: Optional[bytes]) -> bool:
        if not self.keys:
            return True
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token_digest = _digest(token.strip())
        found = False
        for key_digest in self._digests:  # every key compared: the time does not say which one matched
            found |= hmac.compare_digest(token_digest, key_digest)
        return found


# The policy of the Ingress replica in this process. Serve runs a copy of the FastAPI app taken when
# cotrec/serve_app.py is imported, before any args are known, so the replica's constructor installs its
# policy here and the guard of that copy reads it per request. Nothing installed: every request 503.
_INSTALLED: list[Optional[Policy]] = [None]


def install_policy(policy: Optional[Policy]) -> None:
    _INSTALLED[0] = policy


def installed_policy() -> Optional[Policy]:
    return _INSTALLED[0]


class BodyTooLarge(HTTPException):
    """Raised from the counted receive stream; an HTTPException, so a FastAPI route reading the body
    passes it on as it is (any other error there becomes a 400)."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"the body must be at most {limit} bytes")


def _json(status: int, content: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> list[dict[str, Any]]:
    body = json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]},
            {"type": "http.response.body", "body": body}]


class Guard:
    """ASGI middleware: `Guard(app, policy)`, `policy` a `Policy` or a function returning one."""

    def __init__(self, app: Any, policy: Union[Policy, Callable[[], Optional[Policy]]] = installed_policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received_at = time.time()  # wall clock: the client's send time is compared with it (the proxy hop)
        policy = self.policy() if callable(self.policy) else self.policy
        headers = dict(scope.get("headers") or [])
        given = headers.get(REQUEST_ID_HEADER, b"")
        # Serve's proxy names each request and puts that id on the reply: one id in both logs, one header
        named = bool(REQUEST_ID.fullmatch(given))
        request_id = given.decode("ascii") if named else uuid.uuid4().hex[:16]
        scope.setdefault("state", {}).update(request_id=request_id, received_at=received_at)
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not named:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (REQUEST_ID_HEADER, request_id.encode())]}
            await send(message)

        async def reply(status: int, detail: str, *headers: tuple[bytes, bytes], **extra: Any) -> None:
            for message in _json(status, {"detail": detail, **extra}, headers):
                await send_with_id(message)

        if policy is None:
            await reply(503, "the service is starting; try again")
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path not in policy.open_paths and not policy.admits(headers.get(b"authorization")):
            await reply(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                        (b"www-authenticate", b'Bearer realm="cotrec"'))
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > policy.max_body_bytes):
            await reply(413 if length.isdigit() else 400,
                        f"the body must be at most {policy.max_body_bytes} bytes" if length.isdigit()
                        else "Content-Length is not a number")
            return
        read = 0

        async def counted_receive() -> dict[str, Any]:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > policy.max_body_bytes:
                    raise BodyTooLarge(policy.max_body_bytes)
            return message

        task = asyncio.ensure_future(self.app(scope, counted_receive, send_with_id))
        try:
            done, _ = await asyncio.wait({task}, timeout=policy.timeout_s)
        except asyncio.CancelledError:  # the client went away: so does the work
            task.cancel()
            raise
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if not started:
                await reply(504, f"the request took longer than {policy.timeout_s:g} s; try again")
            return
        try:
            task.result()
        except BodyTooLarge as exc:
            if not started:
                await reply(exc.status_code, exc.detail)
        except Exception:
            LOG.error("request %s: %s %s failed", request_id, scope.get("method"), path, exc_info=True)
            if not started:
                await reply(500, "internal error", request_id=request_id)
