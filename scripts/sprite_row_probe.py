"""Does a sprite-world model read the caption's row? Entrances with no past, one per (side, named row).

    python scripts/sprite_row_probe.py --model DIR [--json probe.json]

For each side and each named row, the held-out episode 900001 is rendered free-running (``window`` memory,
storyboard seed 7) with its entrance caption naming that side and row and no lead chunks; the first frame's
4 × 4 cells are reduced to the mean of each pixel's brightest channel (0–255). A model that reads the row
lights the named row's edge cell only; a row-blind one lights the whole edge column alike. Also printed:
the text encoder's relative distance ‖a − b‖/‖a‖ between entrance captions that differ only in the row,
and between two that differ only in the colour (a word the model does read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch

    from slotgen.bench.sprites import render_sprite_frames
    from slotgen.models.miniature import load_miniature
    from slotgen.world.sprites import CELL, GRID, ROWS, SIDES, sprite_episode

    torch.set_num_threads(1)
    bundle = load_miniature(args.model)

    @torch.no_grad()
    def embed(text: str) -> torch.Tensor:
        t = bundle.tokenizer(text, max_length=bundle.settings.text_len, padding="max_length", truncation=True,
                             return_tensors="pt")
        h = bundle.text_encoder(t.input_ids, t.attention_mask).last_hidden_state[0]  # (L, d)
        return h * t.attention_mask[0, :, None]

    def dist(a: str, b: str) -> float:
        ea, eb = embed(a), embed(b)
        return round(float((ea - eb).norm() / ea.norm()), 3)

    entrance = "a red square with a cyan dot enters from the left in the {} row"
    rows = {f"{a}-{b}": dist(entrance.format(a), entrance.format(b)) for i, a in enumerate(ROWS) for b in ROWS[i + 1:]}
    colours = {"red-blue": dist(entrance.format("top"), entrance.format("top").replace("red", "blue"))}
    out: dict = {"model": str(args.model), "text_distance": {"rows": rows, "colours": colours}, "entrances": []}
    print(json.dumps(out["text_distance"]))
    for side in SIDES:
        for r, row in enumerate(ROWS):
            ep = sprite_episode(900_001, 0, lead=0)
            ep.captions[0] = f"{ep.sprite.words(True)} enters from the {side} in the {row} row"
            frame = render_sprite_frames(ep, "window", bundle, 7)[0]  # (64, 64, 3)
            cells = frame.max(-1).reshape(GRID, CELL, GRID, CELL).mean((1, 3))  # (4, 4)
            col = 0 if side == "left" else GRID - 1
            edge = [round(float(v)) for v in cells[:, col]]
            out["entrances"].append({"side": side, "row": row, "edge_column": edge,
                                     "named_row_minus_others": round(float(cells[r, col] - np.delete(cells[:, col], r).mean()), 1)})
            print(json.dumps(out["entrances"][-1]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
