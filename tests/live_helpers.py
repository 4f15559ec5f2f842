"""Helpers for the live tests: a small fast story and a uvicorn server on a free port in a thread."""

from __future__ import annotations

import socket
import threading
import time

from slotgen.storyboard import parse_storyboard

RED = "a red circle moves right on a blue background"
GREEN = "a green square enters from the left on a white background"
YELLOW = "a yellow star moves up on a purple background"
# 32x32 and 2 sampler steps: a miniature chunk (3 frames) takes a few hundredths of a second
STORY = f"""fps: 16
resolution: 32x32
sampler: {{steps: 2}}
seed: 11
memory: {{policy: slot}}
duration: 600
prompts:
  - prompt: {RED}
"""


def story():
    return parse_storyboard(STORY, "live.yaml")


class ServerThread:
    """``create_app(session)`` served by uvicorn on 127.0.0.1:<free port> in a thread."""

    def __init__(self, session, token=None, idle_stop=None, sndbuf: int | None = None):
        import uvicorn

        from slotgen.live.app import create_app
        from slotgen.live.server import WS_MAX_SIZE, check_bind

        self.session = session
        self.sock = check_bind("127.0.0.1", 0, token)
        if sndbuf is not None:  # accepted connections inherit it: a small one makes back-pressure quick
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        app = create_app(session, token=token, idle_stop=idle_stop)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=WS_MAX_SIZE,
                                                    timeout_graceful_shutdown=3))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        self.session.stop()
        self.session.wait(60)


def wait_for(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
