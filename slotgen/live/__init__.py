"""``slotgen live``: direct a story while it renders, from a local web page, and keep an exact record.

:mod:`.session` (the render on a worker thread, the prompt decisions at chunk boundaries, the record),
:mod:`.broadcast` (frames to viewers through bounded queues), :mod:`.app` (the FastAPI app and the page
in ``static/``), :mod:`.server` (binding, token rule, uvicorn). See docs/LIVE.md.
"""

from slotgen.live.session import LiveSession, check_prompt

__all__ = ["LiveSession", "check_prompt"]
