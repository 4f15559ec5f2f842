"""Serving a live session: checks (host, token, port) then uvicorn on a socket bound here.

:func:`check_bind` refuses a non-loopback host without a token and returns the bound socket, so a port
in use is one line before anything loads. :func:`serve` runs uvicorn until the session ends (the stop
button, the browser closed, Ctrl-C, SIGTERM or SIGHUP); uvicorn's shutdown stops the session, which
closes the videos and writes ``story.yaml`` and ``snapshot.pt``.
"""

from __future__ import annotations

import ipaddress
import signal
import socket

from slotgen.errors import SlotgenError

WS_MAX_SIZE = 64 * 1024
"""Largest WebSocket message accepted from a page (it sends none)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int, token: str | None) -> socket.socket:
    """A listening socket on ``host:port``; one-line :class:`SlotgenError` when it cannot be."""
    if not is_loopback(host) and not token:
        raise SlotgenError(f"--host {host}: serving beyond this machine needs --token (every request and socket "
                           f"must carry it)")
    if token is not None and (len(token) < 8 or not token.isprintable() or " " in token):
        raise SlotgenError("--token: at least 8 printable characters, no spaces")
    if not 0 <= port <= 65535:
        raise SlotgenError(f"--port: expected 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SlotgenError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise SlotgenError(f"port {port} on {host} is in use; pass another --port (or 0 for any free port)") from None
        raise SlotgenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str, token: str | None) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def _server_class():
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with Ctrl-C, SIGTERM and SIGHUP (a closed terminal) as a graceful stop that
        lets the process exit normally afterwards (uvicorn re-raises the signal, killing it before the
        caller can report); :attr:`signalled` tells which one came."""

        signalled: int | None = None

        def handle_exit(self, sig, frame) -> None:
            self.signalled = self.signalled or sig
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def serve(session, sock: socket.socket, *, token: str | None = None, idle_stop: float | None = 10.0,
          log_level: str = "warning") -> int | None:
    """Run the page for ``session`` on ``sock`` until the session has finished; returns the signal that
    stopped it, if one did."""
    import uvicorn

    from slotgen.live.app import create_app

    holder: dict = {}

    def finished() -> None:
        holder["server"].should_exit = True

    app = create_app(session, token=token, idle_stop=idle_stop, on_finished=finished)
    config = uvicorn.Config(app, log_level=log_level, ws_max_size=WS_MAX_SIZE, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = holder["server"] = _server_class()(config)
    server.run(sockets=[sock])
    if not session.wait(0):  # uvicorn did not get to its shutdown (e.g. a second Ctrl-C): finish anyway
        session.stop()
        session.wait()
    return server.signalled


def run_live(storyboard=None, *, out, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
             resume=None, model: str | None = None, memory=None, device: str = "cpu", realtime: bool = True,
             idle_stop: float | None = 10.0, snapshot_every=30.0, print_line=print) -> "object":
    """What ``slotgen live`` does: check, bind, load, print the URL, serve until the session ends.
    ``storyboard``: a validated Storyboard (``model``/``memory``: overrides); returns the session."""
    from pathlib import Path

    from slotgen.live.session import LiveSession
    from slotgen.preflight import check_device

    if resume is not None and storyboard is not None:
        raise SlotgenError("give either a storyboard or --resume, not both")
    if resume is not None and (model is not None or memory is not None):
        raise SlotgenError("--resume continues the snapshot's model and memory; drop --model/--memory")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SlotgenError(f"--out {str(out)!r} is a file; name a folder")
    if out.is_dir() and any((out / n).exists() for n in ("live.mp4", "story.yaml", "snapshot.pt")):
        raise SlotgenError(f"--out {str(out)!r} already holds a live session; name another folder")
    dev = check_device(device)
    sock = check_bind(host, port, token)
    try:
        if storyboard is not None or model is not None or memory is not None:
            from slotgen.live.session import DEFAULT_PROMPT
            from slotgen.storyboard import PromptSpan, Storyboard

            sb = storyboard if storyboard is not None else \
                Storyboard(duration=3600.0, prompts=[PromptSpan(start=0, end=3600.0, text=DEFAULT_PROMPT)])
            overrides = {k: v for k, v in {"model": model, "memory": memory}.items() if v is not None}
            storyboard = sb.with_overrides(**overrides) if overrides else sb
        session = LiveSession(storyboard, out=out, resume=resume, device=dev, realtime=realtime,
                              snapshot_every=snapshot_every)
        for w in session.warnings:
            print_line(f"warning: {w}")
        print_line(f"slotgen live: {url_of(sock, host, token)}  (output: {out}; Ctrl-C stops and saves)")
        session.signalled = serve(session, sock, token=token, idle_stop=idle_stop)
    finally:
        sock.close()
    p = session.paths()
    if session.status == "failed":
        raise SlotgenError(f"the live render failed: {session.error}; the last checkpoint {str(p['snapshot'])!r} resumes")
    print_line(f"wrote {p['video']}, {p['lossless']}, {p['story']}, {p['snapshot']}")
    return session
