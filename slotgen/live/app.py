"""The live page's server: a FastAPI app over one :class:`~slotgen.live.session.LiveSession`.

Routes (all behind the token when one is set: ``?token=T`` or ``Authorization: Bearer T``):

* ``GET /`` the page, ``GET /static/...`` its script and style (plain files, no build step);
* ``GET /api/state`` what the page shows (:class:`~slotgen.live.session.LiveState`);
* ``POST /api/prompt`` ``{"text", "transition", "blend"}``: the next prompt (next chunk boundary);
* ``POST /api/pause``, ``/api/resume``, ``/api/stop``, ``/api/snapshot``;
* ``WS /ws``: state JSON (text messages) and decoded frames (binary, see :mod:`slotgen.live.broadcast`).

Nothing the page sends names a path: the output folder and every file name are the server's. Request
bodies are capped at :data:`MAX_BODY` bytes before they are read; every refusal is ``{"error": one line}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from slotgen.errors import SlotgenError
from slotgen.live.session import LiveSession

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024
"""Largest request body accepted, in bytes (a prompt is at most a few KB)."""


class PromptBody(BaseModel):
    text: object = None
    transition: object = 0.0
    blend: object = "linear"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


class Guard:
    """Pure ASGI middleware: the token on every HTTP request and WebSocket, and the body size cap."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    def _token_ok(self, scope) -> bool:
        if not self.token:
            return True
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value.lower().startswith(b"bearer "):
                given = value[7:].decode("latin-1").strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if not self._token_ok(scope):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008, "reason": "wrong or missing token"})
            return await _error(401, "wrong or missing token")(scope, receive, send)
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            headers = dict(scope.get("headers", []))
            length = headers.get(b"content-length")
            if length is None:
                if headers.get(b"transfer-encoding") is not None:
                    return await _error(411, "send a Content-Length")(scope, receive, send)
            elif not length.isdigit() or int(length) > MAX_BODY:
                return await _error(413, f"request body over {MAX_BODY} bytes")(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(session: LiveSession, *, token: str | None = None, idle_stop: float | None = 10.0,
               on_finished: Callable[[], None] | None = None) -> Guard:
    """The ASGI app for ``session`` (started on startup, stopped and waited for on shutdown).

    ``idle_stop``: seconds after the last viewer leaves (the browser closed) before the session stops;
    None: never. ``on_finished``: called on the event loop once the render has finished (the CLI
    uses it to shut the server down)."""
    loop_ref: dict = {}

    def push_state(kind: str = "state", data: dict | None = None) -> None:
        text = json.dumps({"type": "state", "event": kind, **asdict(session.state())})
        session.broadcast.state(text)

    async def watch() -> None:
        """Stop when the browser has been closed for ``idle_stop`` s; report the end of the render."""
        seen = False
        alone_since = None
        loop = asyncio.get_running_loop()
        while not session.wait(0):
            await asyncio.sleep(0.2)
            n = session.broadcast.count()
            seen = seen or n > 0 or session.broadcast.joined > 0  # a page that left before this look counts
            if n or not seen or idle_stop is None:
                alone_since = None
            elif alone_since is None:
                alone_since = loop.time()
            elif loop.time() - alone_since >= idle_stop:
                session.stop()
        push_state()
        await asyncio.sleep(0.3)  # let the viewers draw the final state
        if on_finished is not None:
            on_finished()

    @asynccontextmanager
    async def lifespan(app):
        loop_ref["loop"] = asyncio.get_running_loop()
        session.on_event = push_state
        if session.thread is None:
            session.start()
        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            session.stop()
            await asyncio.get_running_loop().run_in_executor(None, session.wait)
            task.cancel()

    app = FastAPI(title="slotgen live", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(422, f"{where}: {first['msg']}" if where else first["msg"])

    @app.exception_handler(SlotgenError)
    async def refused(request: Request, exc: SlotgenError):
        return _error(400, str(exc))

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    async def state():
        return asdict(session.state())

    @app.post("/api/prompt")
    async def prompt(body: PromptBody):
        out = session.submit(body.text, body.transition, body.blend)
        push_state("typed")
        return out

    @app.post("/api/pause")
    async def pause():
        session.pause()
        push_state()
        return {"status": session.status}

    @app.post("/api/resume")
    async def resume():
        session.resume()
        push_state()
        return {"status": session.status}

    @app.post("/api/stop")
    async def stop():
        session.stop()
        push_state()
        return {"status": session.status}

    @app.post("/api/snapshot")
    async def snapshot():
        name = await asyncio.get_running_loop().run_in_executor(None, session.snapshot)
        push_state()
        return {"snapshot": name}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        viewer = session.broadcast.add(asyncio.get_running_loop())
        viewer.offer_state(json.dumps({"type": "state", "event": "hello", **asdict(session.state())}))

        async def drain_incoming() -> None:  # the page sends nothing; a close ends the viewer
            try:
                while True:
                    await websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError, KeyError):
                viewer.close()

        reader = asyncio.create_task(drain_incoming())
        try:
            async for msg in viewer.messages():
                if isinstance(msg, bytes):
                    await websocket.send_bytes(msg)
                else:
                    await websocket.send_text(msg)
            await websocket.close()
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            reader.cancel()
            session.broadcast.remove(viewer)

    return Guard(app, token)
