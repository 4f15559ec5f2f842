"""Frames and state to any number of viewers, never holding up the render.

The render's decode worker calls :meth:`Broadcaster.write` (it is a video writer like the MP4's); every
frame is PNG-encoded once (lossless: a viewer sees the exact frames) and offered to each viewer's
bounded queue. A full queue drops its oldest frame, so a slow or stuck viewer costs at most
``depth`` frames of memory and never blocks: delivery happens on the server's event loop, one
sender task per viewer (:meth:`Viewer.frames`), and a viewer whose socket is not read only stalls
its own task.

Binary message layout: 8 bytes little-endian ``uint32 frame index, uint32 chunk`` then the PNG.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
from collections import deque

import numpy as np

FRAME_HEADER = struct.Struct("<II")
DEFAULT_DEPTH = 16
"""Frames a viewer may lag behind before its oldest are dropped."""


def encode_png(frame: np.ndarray) -> bytes:
    """One (H, W, 3) uint8 frame as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Viewer:
    """One connected page: a bounded frame queue and the latest state, filled from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = DEFAULT_DEPTH):
        self.loop = loop
        self.queue: deque[bytes] = deque(maxlen=depth)
        self.state: str | None = None
        self.ready = asyncio.Event()
        self.dropped = 0
        self.sent = 0
        self.closed = False

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the loop is gone: the server is shutting down
            self.closed = True

    def offer_frame(self, message: bytes) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(message)  # a full deque drops its oldest
        self._wake()

    def offer_state(self, text: str) -> None:
        self.state = text  # only the newest state matters
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    async def messages(self):
        """Yield ``str`` (state JSON) and ``bytes`` (frames) as they come, until closed."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            if self.state is not None:
                text, self.state = self.state, None
                yield text
            while self.queue:
                try:
                    msg = self.queue.popleft()
                except IndexError:
                    break
                self.sent += 1
                yield msg
            if self.closed and not self.queue and self.state is None:
                return


class Broadcaster:
    """A writer that fans decoded frames out to the viewers (see the module docstring)."""

    def __init__(self, fps: int, first_frame: int = 0, chunk_of=None, depth: int = DEFAULT_DEPTH):
        self.fps = fps
        self.depth = depth
        self.next_frame = first_frame
        self.chunk_of = chunk_of or (lambda frame: 0)
        self.viewers: set[Viewer] = set()
        self._lock = threading.Lock()
        self.closed = False
        self.frames_written = 0
        self.joined = 0  # viewers ever added (one that came and went between two looks still counts)

    def add(self, loop: asyncio.AbstractEventLoop) -> Viewer:
        v = Viewer(loop, self.depth)
        with self._lock:
            self.viewers.add(v)
            self.joined += 1
        if self.closed:
            v.close()
        return v

    def remove(self, viewer: Viewer) -> None:
        with self._lock:
            self.viewers.discard(viewer)

    def count(self) -> int:
        with self._lock:
            return len(self.viewers)

    def write(self, frames: np.ndarray) -> None:
        """(N, H, W, 3) uint8 frames, in order (called by the render's decode worker)."""
        with self._lock:
            viewers = list(self.viewers)
        for frame in frames:
            index = self.next_frame
            self.next_frame += 1
            self.frames_written += 1
            if not viewers:
                continue
            msg = FRAME_HEADER.pack(index, self.chunk_of(index)) + encode_png(np.ascontiguousarray(frame))
            for v in viewers:
                v.offer_frame(msg)

    def state(self, text: str) -> None:
        with self._lock:
            viewers = list(self.viewers)
        for v in viewers:
            v.offer_state(text)

    def close(self) -> None:
        self.closed = True
        with self._lock:
            viewers = list(self.viewers)
        for v in viewers:
            v.close()
