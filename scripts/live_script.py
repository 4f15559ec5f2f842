"""Play a live session without a browser: type prompts at given chunks, stop after N chunks.

The same session `slotgen live` serves (slotgen.live.LiveSession), driven from its chunk events, so
the prompts land on exact chunks: a prompt typed after chunk C takes effect at chunk C + 1 (it
has not started yet, so it is decided again); a stop after chunk C ends the video after chunk C + 1. Writes the live output folder (live.mp4, live.mkv, story.yaml,
snapshot.pt).

    python scripts/live_script.py [STORY.yaml] --out DIR --type "CHUNK:TEXT[:SECONDS[:linear|slerp]]" ... --chunks N
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("story", nargs="?", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", action="append", default=[], metavar="CHUNK:TEXT[:SECONDS[:BLEND]]")
    ap.add_argument("--chunks", type=int, required=True, help="stop after this many chunks")
    args = ap.parse_args()

    from slotgen.errors import SlotgenError
    from slotgen.live import LiveSession
    from slotgen.storyboard import load_storyboard

    try:
        typed = {}
        for item in args.type:
            chunk, text, *rest = item.split(":")
            typed[int(chunk)] = (text, float(rest[0]) if rest else 0.0, rest[1] if len(rest) > 1 else "linear")
        session = LiveSession(load_storyboard(args.story) if args.story else None, out=args.out, realtime=False)

        def on_event(kind: str, data: dict) -> None:
            if kind != "chunk":
                return
            c = data["chunk"]
            if c in typed:
                session.submit(*typed[c])
            if c + 2 >= args.chunks:  # chunk c + 1 is decided already: the stream ends after it
                session.stop()

        session.on_event = on_event
        session.start()
        session.wait()
        if session.status != "stopped":
            raise SlotgenError(f"the live render failed: {session.error}")
    except SlotgenError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    p = session.paths()
    print(f"{session.chunks_done} chunks; wrote {p['video']}, {p['lossless']}, {p['story']}, {p['snapshot']}")


if __name__ == "__main__":
    main()
