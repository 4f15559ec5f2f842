"""Decode and write overlapped with generation: a bounded queue to one worker thread.

The chunk loop hands each chunk's clean latents to :class:`DecodeWorker` and goes on with the next
chunk while the worker decodes (the causal VAE with its cache, :class:`~slotgen.video.decoder.StreamingDecoder`),
copies the frames to the host and hands them to ``emit`` (the writers). Guarantees:

* **order**: one worker, FIFO queue: chunks are decoded and emitted in generation order, and the
  decoder's causal cache sees them in that order (the frames are bit-identical to inline decoding);
* **back-pressure**: the queue holds at most ``depth`` chunks; ``put`` blocks while it is full, so
  generation never runs more than ``depth`` chunks ahead of the writers and memory stays bounded;
* **interruption and snapshots**: :meth:`drain` returns when every queued chunk is decoded and
  emitted, so after it the decoder state, the writers and the engine agree exactly as without overlap
  (``Renderer.stream`` drains before it returns; a snapshot is only taken after that);
* **errors**: an exception in the worker is raised again in the caller at the next ``put``/``drain``;
* **first frames first**: ``put(..., wait_first=True)`` decodes that chunk with ``pieces`` (which yields
  its frames in pieces, one latent frame's each: :meth:`~slotgen.video.decoder.StreamingDecoder.decode_frames`),
  emits each piece as soon as it is decoded and returns once the first is emitted (a live page's first
  frame under a new prompt goes out before the caller's next transformer pass); other chunks are
  decoded whole.

On CUDA the worker runs on its own stream, ordered after the generating stream with an event, so the
decode and its device → host copy overlap the next chunk's transformer passes.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

_STOP = object()


class DecodeWorker:
    def __init__(self, decode: Callable[[torch.Tensor], object], emit: Callable[[object, object], None],
                 depth: int = 1, device: torch.device | str = "cpu",
                 pieces: Callable[[torch.Tensor], object] | None = None):
        """decode(latents) → frames, pieces(latents) → an iterable of frame batches (for ``wait_first``),
        run on the worker; emit(item, frames), run on the worker in order."""
        self.decode, self.emit, self.pieces = decode, emit, pieces
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="slotgen-decode", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            try:
                if job is _STOP:
                    return
                item, latents, ready, first = job
                if self.error is None:  # after a failure, queued chunks are dropped (the caller raises)
                    if self.stream is not None:
                        self.stream.wait_event(ready)  # the latents are complete on the generating stream
                        latents.record_stream(self.stream)
                        with torch.cuda.stream(self.stream):
                            self._decode_emit(item, latents, first)
                    else:
                        self._decode_emit(item, latents, first)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.error = e
            finally:
                if job is not _STOP and job[3] is not None:
                    job[3].set()  # emitted (or failed): a caller waiting for the first piece goes on
                self.queue.task_done()

    def _decode_emit(self, item: object, latents: torch.Tensor, first: threading.Event | None) -> None:
        if first is None or self.pieces is None:
            self.emit(item, self.decode(latents))
            return
        for frames in self.pieces(latents):
            self.emit(item, frames)
            if first is not None:
                first.set()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def put(self, item: object, latents: torch.Tensor, wait_first: bool = False) -> None:
        """Queue a chunk (blocks while ``depth`` chunks are waiting); ``wait_first``: then wait until its
        first piece (all its frames without ``pieces``) is emitted, and raise a worker error."""
        self._raise()
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        first = threading.Event() if wait_first else None
        self.queue.put((item, latents, ready, first))
        if first is not None:
            first.wait()
            self._raise()

    def drain(self) -> None:
        """Wait until every queued chunk is decoded and emitted; raise a worker error."""
        self.queue.join()
        self._raise()

    def close(self) -> None:
        """Drain, then stop the thread (idempotent)."""
        if self.thread.is_alive():
            self.queue.join()
            self.queue.put(_STOP)
            self.thread.join()
        self._raise()
