"""The sprite world: entities aligned to the token grid, so every frame is a function of the captions and the past.

The shape worlds (:mod:`slotgen.world.scene`) move an entity 1 px a frame across 16×16-pixel tokens, so a
token's content is a shape cut at any of 256 sub-token offsets: the transformer has to learn a continuous
renderer. Here a sprite fills exactly one token cell (16×16 px at 64×64, the miniature's token grid is
4×4) and moves one whole cell per chunk (3 video frames); the frames of a chunk are identical. A token's
content is then one of a small finite set (empty, or one of 4 shapes × 5 colours × 4 traits).

An episode (:func:`sprite_episode`), in chunks:

* ``lead`` (0–2) empty chunks: ``"a black background"``;
* the **entrance**: the sprite appears in the edge cell of the named side in the named row, and the
  caption names everything the frame leaves open: ``"a red circle with a cyan dot enters from the left in
  the top row"`` (side, row, colour, kind, trait);
* 3 chunks ``"a red circle moves right"``: one cell a chunk to the far edge;
* the **exit** chunk, empty: ``"a red circle leaves the frame to the right"``;
* ``gap`` (0–8) empty chunks: ``"a black background"``;
* the **return**: the sprite appears in the edge cell of the named side and row, ``"a red circle returns
  from the right in the lower row"`` — the trait is not named (no caption after the exit names it, so after
  a gap longer than the window only memory can bring it back; 4 trait values, chance 1/4);
* 3 chunks ``"a red circle stays"``.

Consecutive chunks with the same caption form one prompt. Rows: ``top``, ``upper``, ``lower``,
``bottom``; traits: ``no dot`` or a ``cyan``/``pink``/``white`` dot (4×4 px inside the shape).

:func:`analyse_sprites` scores a video cell by cell against the episode's exact cell map (ground truth
scores 1.0 on every metric; the definitions are fixed in its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

CELL = 16  # pixels per cell (= one miniature token at 64×64)
GRID = 4  # cells per side
SIZE = CELL * GRID  # 64
CHUNK = 3  # video frames per chunk (the miniature's chunk)
FPS = 16

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "yellow": (235, 225, 40), "blue": (50, 90, 245),
    "purple": (170, 60, 225),
}
TRAITS: tuple[str, ...] = ("no", "cyan", "pink", "white")  # the dot's colour; "no": no dot
DOT_COLOURS: dict[str, tuple[int, int, int]] = {"cyan": (0, 235, 235), "pink": (255, 120, 200), "white": (255, 255, 255)}
ROWS: tuple[str, ...] = ("top", "upper", "lower", "bottom")
SIDES: tuple[str, ...] = ("left", "right")
BACKGROUND = (0, 0, 0)
CHANCE = 1.0 / len(TRAITS)  # two independent trait draws agree
DOT = (slice(8, 12), slice(6, 10))  # the dot's 4×4 pixels inside a cell (rows, cols)

SPRITE_WORDS: tuple[str, ...] = ("row", "upper", "lower", "no")
"""Words the sprite world's captions use beyond the miniature's vocabulary (``VOCABULARY``)."""


def _shape_masks() -> dict[str, np.ndarray]:
    """(CELL, CELL) bool mask of each shape, centred in its cell with a 2-px margin."""
    y, x = np.mgrid[0:CELL, 0:CELL] + 0.5
    c = CELL / 2
    circle = (y - c) ** 2 + (x - c) ** 2 <= 6.5**2
    square = (np.abs(y - c) <= 6) & (np.abs(x - c) <= 6)
    triangle = (y >= 2) & (y <= 14) & (np.abs(x - c) <= (y - 2) * 7.0 / 12.0 + 0.5)
    star = ((np.abs(y - c) <= 3) & (np.abs(x - c) <= 7)) | ((np.abs(x - c) <= 3) & (np.abs(y - c) <= 7))
    star |= np.abs(y - c) + np.abs(x - c) <= 6
    return {"circle": circle, "square": square, "triangle": triangle, "star": star}


MASKS: dict[str, np.ndarray] = _shape_masks()


@dataclass(frozen=True)
class Sprite:
    shape: str
    colour: str
    trait: str  # one of TRAITS

    def words(self, with_trait: bool) -> str:
        text = f"a {self.colour} {self.shape}"
        if with_trait:
            text += f" with {'no' if self.trait == 'no' else 'a ' + self.trait} dot"
        return text


@dataclass
class SpriteEpisode:
    """A scripted episode: per chunk, the sprite's cell (or None) and the caption in force."""

    seed: int
    sprite: Sprite
    cells: list[Optional[tuple[int, int]]]  # per chunk: (row, col) of the sprite, None when off stage
    captions: list[str]  # per chunk
    traits: list[str] = field(default_factory=list)  # per chunk: the trait drawn (the sprite's; tests may swap it)
    enter_chunk: int = 0
    leave_chunk: int = 0  # the first empty chunk after the crossing
    return_chunk: int = 0
    gap: int = 0  # empty chunks between the exit chunk and the return
    script: tuple = ()  # everything that decides the episode (held-out episodes are new scripts)

    @property
    def chunks(self) -> int:
        return len(self.cells)

    @property
    def total_frames(self) -> int:
        return CHUNK * self.chunks

    def absent_frames(self) -> int:
        """Video frames between the sprite's last frame before the exit and its return."""
        return CHUNK * (self.return_chunk - self.leave_chunk)

    def prompts(self) -> list[tuple[int, int, str]]:
        """``(start_frame, end_frame, caption)``: consecutive chunks with one caption merged."""
        out: list[tuple[int, int, str]] = []
        for c, text in enumerate(self.captions):
            if out and out[-1][2] == text:
                out[-1] = (out[-1][0], CHUNK * (c + 1), text)
            else:
                out.append((CHUNK * c, CHUNK * (c + 1), text))
        return out


def sprite_episode(seed: int, gap: Optional[int] = None, *, lead: Optional[int] = None,
                   rng: Optional[np.random.Generator] = None) -> SpriteEpisode:
    """The seeded episode ``seed`` (see the module docstring); ``gap``/``lead`` fix those empty-chunk counts."""
    rng = np.random.default_rng([seed, 24]) if rng is None else rng
    sprite = Sprite(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                    TRAITS[rng.integers(len(TRAITS))])
    side, row = SIDES[rng.integers(2)], int(rng.integers(GRID))
    back_side, back_row = SIDES[rng.integers(2)], int(rng.integers(GRID))
    gap = int(rng.integers(0, 9)) if gap is None else int(gap)
    lead = int(rng.integers(0, 3)) if lead is None else int(lead)
    if gap < 0 or lead < 0:
        raise ValueError(f"gap and lead must be non-negative, got {gap}, {lead}")
    far = "right" if side == "left" else "left"
    step = 1 if side == "left" else -1
    col0 = 0 if side == "left" else GRID - 1
    empty = "a black background"
    cells: list[Optional[tuple[int, int]]] = [None] * lead
    captions = [empty] * lead
    enter = len(cells)
    cells.append((row, col0))
    captions.append(f"{sprite.words(True)} enters from the {side} in the {ROWS[row]} row")
    for k in range(1, GRID):
        cells.append((row, col0 + step * k))
        captions.append(f"{sprite.words(False)} moves {far}")
    leave = len(cells)
    cells.append(None)
    captions.append(f"{sprite.words(False)} leaves the frame to the {far}")
    cells += [None] * gap
    captions += [empty] * gap
    ret = len(cells)
    back_col = 0 if back_side == "left" else GRID - 1
    for k in range(4):
        cells.append((back_row, back_col))
        captions.append(f"{sprite.words(False)} returns from the {back_side} in the {ROWS[back_row]} row" if k == 0
                        else f"{sprite.words(False)} stays")
    script = (sprite, side, row, back_side, back_row, gap, lead)
    return SpriteEpisode(seed, sprite, cells, captions, [sprite.trait] * len(cells), enter, leave, ret, gap, script)


def with_return_trait(ep: SpriteEpisode, trait: str) -> SpriteEpisode:
    """The same episode whose sprite comes back with ``trait`` (the identity swap the analyser must catch)."""
    traits = [trait if c >= ep.return_chunk else t for c, t in enumerate(ep.traits)]
    return SpriteEpisode(ep.seed, ep.sprite, list(ep.cells), list(ep.captions), traits, ep.enter_chunk,
                         ep.leave_chunk, ep.return_chunk, ep.gap, ep.script)


def draw_cell(frame: np.ndarray, row: int, col: int, sprite: Sprite, trait: str) -> None:
    """Draw ``sprite`` with ``trait`` into cell (row, col) of an (H, W, 3) uint8 frame, in place."""
    cell = frame[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
    cell[MASKS[sprite.shape]] = COLOURS[sprite.colour]
    if trait != "no":
        cell[DOT] = DOT_COLOURS[trait]


def render_sprites(ep: SpriteEpisode) -> tuple[np.ndarray, np.ndarray]:
    """``(frames, labels)``: uint8 (T, 64, 64, 3) video and (T, 64, 64) bool sprite mask, exact."""
    frames = np.zeros((ep.total_frames, SIZE, SIZE, 3), np.uint8)
    for c, where in enumerate(ep.cells):
        if where is not None:
            draw_cell(frames[CHUNK * c], *where, ep.sprite, ep.traits[c])
        frames[CHUNK * c + 1 : CHUNK * (c + 1)] = frames[CHUNK * c]
    labels = np.any(frames != np.array(BACKGROUND, np.uint8), axis=-1)
    return frames, labels


def training_episodes(n: int, seed: int) -> list[SpriteEpisode]:
    """The ``n`` episodes a run with ``--seed seed`` trains on (episode seeds ``seed·100000 + i``)."""
    return [sprite_episode(seed * 100_000 + i) for i in range(n)]


HELD_OUT_SEED0 = 900_000


def held_out_episodes(n: int, training: int = 512, seed: int = 0, gap: Optional[int] = None) -> list[SpriteEpisode]:
    """``n`` episodes (seeds ``900000 + i``, skipping any) whose script no episode of a ``training``-episode run
    with ``--seed seed`` has: held-out episodes are new combinations, not repeats."""
    seen = {ep.script for ep in training_episodes(training, seed)}
    out: list[SpriteEpisode] = []
    s = HELD_OUT_SEED0
    while len(out) < n:
        ep = sprite_episode(s, gap)
        if ep.script not in seen:
            out.append(ep)
        s += 1
    return out


def storyboard_yaml(ep: SpriteEpisode, seed: int = 0, memory: Optional[dict] = None, title: Optional[str] = None) -> str:
    """A slotgen storyboard prompting the episode's captions at their chunks' first frames."""
    import yaml

    def sec(frames: int):
        v = frames / FPS
        return int(v) if v.is_integer() else v

    data: dict = {"title": title or f"sprite episode, seed {ep.seed}", "duration": sec(ep.total_frames), "fps": FPS,
                  "resolution": f"{SIZE}x{SIZE}", "seed": int(seed)}
    if memory is not None:
        data["memory"] = dict(memory)
    data["prompts"] = [{"at": sec(start), "prompt": text} for start, _, text in ep.prompts()]
    return ("# A sprite-world episode (slotgen.world.sprites); the trait is named only at the entrance.\n"
            + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


# ------------------------------------------------------------------------------------------------
# The cell analyser


@dataclass(frozen=True)
class CellReading:
    """What a cell of a frame shows: nothing, or a sprite's shape, colour and trait as read from its pixels."""

    shape: Optional[str]
    colour: Optional[str]
    trait: Optional[str]

    @property
    def sprite(self) -> bool:
        return self.shape is not None


EMPTY = CellReading(None, None, None)
MIN_COVER = 0.15  # a cell holds a sprite when at least this fraction of its pixels is far from the background
BRIGHT = 60.0  # a pixel is "on" when its largest channel exceeds this (the background is black)


def read_cell(cell: np.ndarray) -> CellReading:
    """Classify one (16, 16, 3) cell: empty, else the nearest shape mask (IoU), the nearest body colour
    (median of the shape's pixels outside the dot) and the dot's colour (nearest of the dot colours and the
    body colour: the body colour reads as "no")."""
    px = cell.astype(np.float32)
    on = px.max(-1) > BRIGHT
    if on.mean() < MIN_COVER:
        return EMPTY
    shape = max(SHAPES, key=lambda s: (np.logical_and(on, MASKS[s]).sum() / np.logical_or(on, MASKS[s]).sum()))
    body = MASKS[shape].copy()
    body[DOT] = False
    med = np.median(px[body], axis=0)
    colour = min(COLOURS, key=lambda k: float(np.sum((med - np.array(COLOURS[k])) ** 2)))
    dot = np.median(px[DOT].reshape(-1, 3), axis=0)
    options = {"no": np.array(COLOURS[colour], np.float32), **{k: np.array(v, np.float32) for k, v in DOT_COLOURS.items()}}
    trait = min(options, key=lambda k: float(np.sum((dot - options[k]) ** 2)))
    return CellReading(shape, colour, trait)


def read_frame(frame: np.ndarray) -> list[list[CellReading]]:
    """(64, 64, 3) → GRID × GRID cell readings."""
    return [[read_cell(frame[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]) for c in range(GRID)]
            for r in range(GRID)]


@dataclass
class SpriteReport:
    presence: float  # frames with the sprite expected: fraction with a sprite in its cell
    compliance: float  # of those: fraction where that sprite has the named colour and shape
    duplicate_rate: float  # judged frames with a sprite in any cell other than the expected one
    identity_recall: Optional[float]  # 1/0: the trait read at the return (majority over return + stay frames where
    # the right colour and shape are in the expected cell) is the sprite's; None when never drawn there
    return_seen: float  # 1 when the returning sprite is drawn (right cell, colour, shape) in some post-return frame
    trait_accuracy: float  # frames with the sprite expected and compliant: fraction with the right trait
    frames: int


METRICS = ("presence", "compliance", "duplicate_rate", "identity_recall", "return_seen", "trait_accuracy")


def analyse_sprites(frames: np.ndarray, ep: SpriteEpisode, judged_from: int = 0) -> SpriteReport:
    """Score a video (T, 64, 64, 3) uint8 against the episode's cell map (definitions in :class:`SpriteReport`).

    Every frame from ``judged_from`` on counts; frame f expects the cell ``ep.cells[f // 3]``. A trait is
    judged against ``ep.sprite.trait`` (the identity the episode started with), so a sprite that comes back
    with another trait scores recall 0."""
    T = min(len(frames), ep.total_frames)
    expected_n = present = compliant = dup = judged = right_trait = 0
    votes: dict[str, int] = {}
    for f in range(judged_from, T):
        c = f // CHUNK
        where = ep.cells[c]
        cells = read_frame(frames[f])
        judged += 1
        others = [(r, cc) for r in range(GRID) for cc in range(GRID) if cells[r][cc].sprite and (r, cc) != where]
        dup += bool(others)
        if where is None:
            continue
        expected_n += 1
        got = cells[where[0]][where[1]]
        present += got.sprite
        ok = got.sprite and got.colour == ep.sprite.colour and got.shape == ep.sprite.shape
        compliant += ok
        if ok:
            right_trait += got.trait == ep.sprite.trait
            if c >= ep.return_chunk:
                votes[got.trait] = votes.get(got.trait, 0) + 1  # type: ignore[index]
    recall = None
    if votes:
        best = max(votes.values())
        winners = [t for t, v in votes.items() if v == best]
        recall = float(winners == [ep.sprite.trait])  # a tie is not a recall
    return SpriteReport(present / max(expected_n, 1), compliant / max(expected_n, 1), dup / max(judged, 1), recall,
                        float(bool(votes)), right_trait / max(compliant, 1), judged)


__all__ = [
    "CHANCE", "COLOURS", "MASKS", "ROWS", "SHAPES", "SPRITE_WORDS", "TRAITS", "CellReading", "Sprite",
    "SpriteEpisode", "SpriteReport", "analyse_sprites", "held_out_episodes", "read_cell", "read_frame",
    "render_sprites", "sprite_episode", "storyboard_yaml", "training_episodes", "with_return_trait",
]
