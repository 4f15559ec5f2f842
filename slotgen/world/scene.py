"""The synthetic shape world: scripted episodes of coloured shapes with hidden identity traits.

A world frame is a flat background colour with 1–3 *entities* on it. Every entity has

* a **kind** that prompts name: a shape (circle, square, triangle, star) and a main colour;
* **hidden identity traits** that prompts never name, drawn at random per episode: a size class
  (small/large) and a marking (none, a centred dot, or a horizontal stripe) in a marking colour.

A benchmark of identity persistence asks whether an entity that leaves the frame comes back with the
same hidden traits; since the prompts cannot tell the model what they were, only its memory can.

An :class:`Episode` is a list of :class:`Segment` s. Each segment lasts a number of frames during which
one entity performs one action (``enter``, ``move``, ``stay``, ``leave``, ``return``) or nobody acts
(``wait``); every other entity on stage keeps still. Positions follow from the script alone (see
:func:`compute_trajectory`): they do not depend on the hidden traits, so an analyser may use them
without learning the answer. :func:`render_episode` draws frames ``uint8 (T, H, W, 3)`` and the
ground truth (label map, visibility, centres, traits per frame).

Coordinates are pixel coordinates ``(x, y)``: pixel ``[row, col]`` has its centre at ``x = col``,
``y = row``; y grows downwards. docs/WORLD.md documents the palette, traits and actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal, Optional, get_args

import numpy as np

RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------------------
# Palette. Every pair of colours is at least 110 apart in RGB (gray–purple is the closest pair), so a
# pixel within MAX_COLOUR_DISTANCE (see analyse.py) of a palette colour is unambiguous. Background,
# entity and marking colours are disjoint sets.

BACKGROUND_COLOURS: dict[str, RGB] = {
    "blue": (30, 70, 210),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
}
"""Background colours (named in prompts)."""

ENTITY_COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "yellow": (240, 220, 40),
    "purple": (150, 40, 190),
}
"""Main colours of entities (named in prompts)."""

MARKING_COLOURS: dict[str, RGB] = {
    "cyan": (0, 240, 240),
    "pink": (255, 120, 240),
}
"""Colours of markings (hidden traits: never named in prompts, and not in the miniature's vocabulary)."""

PALETTE: dict[str, RGB] = {**BACKGROUND_COLOURS, **ENTITY_COLOURS, **MARKING_COLOURS}
"""Every colour of the world by name, in a fixed order (backgrounds, entities, markings)."""

# --------------------------------------------------------------------------------------------------
# Vocabulary of the world

Shape = Literal["circle", "square", "triangle", "star"]
SizeClass = Literal["small", "large"]
MarkingKind = Literal["none", "dot", "stripe"]
Action = Literal["enter", "move", "stay", "leave", "return", "wait"]
Direction = Literal["left", "right", "up", "down"]

SHAPES: tuple[Shape, ...] = get_args(Shape)
SIZES: tuple[SizeClass, ...] = get_args(SizeClass)
MARKINGS: tuple[MarkingKind, ...] = get_args(MarkingKind)
ACTIONS: tuple[Action, ...] = get_args(Action)
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)

_DIRECTION_ALIASES: dict[str, Direction] = {"top": "up", "bottom": "down"}
_UNIT: dict[Direction, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

STAR_INNER_RATIO = 0.45
"""Inner/outer radius of the five-pointed star (fatter than a regular star, so it survives 64×64)."""

STRIPE_HALF_HEIGHT = 1.5
"""A stripe covers the pixel rows whose centre is within this distance of the marking anchor (3 rows)."""


def direction_vector(direction: Direction) -> tuple[float, float]:
    """Unit vector ``(dx, dy)`` of a direction in pixel coordinates (y down)."""
    return _UNIT[direction]


# --------------------------------------------------------------------------------------------------
# Configuration and script types


@dataclass(frozen=True)
class WorldConfig:
    """Canvas and geometry of the world.

    Attributes:
        width, height: canvas size in pixels (default 64×64, the miniature's resolution).
        fps: frames per second the script's frame counts are meant for (default 16).
        radius_small, radius_large: radius ``r`` of the two size classes in pixels; a shape covers
            the pixels whose centres lie within ``R = r + 0.5`` of its centre (circle radius, square
            half-side, triangle and star circumradius-like extent), i.e. a ``(2r+1)``-pixel box.
        move_speed: pixels per frame of a ``move`` action (at least 0.5, so that motion is visible
            to the analyser's centroid test within a few frames).
        lanes: horizontal lanes of :func:`exit_return_episode` (:func:`lane_rows`); 2 or 3.
        name_lanes: captions name every entity's lane ("in the top lane"), so the first frame of an
            entrance is decided by its caption (grammar.py).
        introduce_traits: the caption of an entity's first entrance names its hidden traits ("a large
            red circle with a cyan dot enters ..."); no later caption does, so after an absence only
            memory can tell them (grammar.py).
    """

    width: int = 64
    height: int = 64
    fps: int = 16
    radius_small: int = 6
    radius_large: int = 9
    move_speed: float = 1.0
    lanes: int = 3
    name_lanes: bool = False
    introduce_traits: bool = False

    def __post_init__(self) -> None:
        if self.radius_small < 2 or self.radius_large <= self.radius_small:
            raise ValueError(f"need 2 <= radius_small < radius_large, got {self.radius_small}, {self.radius_large}")
        if min(self.width, self.height) < 2 * self.margin + 1:
            raise ValueError(f"a {self.width}x{self.height} canvas cannot hold a large entity with a free border")
        if self.fps < 1:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.move_speed < 0.5:
            raise ValueError(f"move_speed must be at least 0.5 px/frame, got {self.move_speed}")
        if self.lanes not in (2, 3):
            raise ValueError(f"lanes must be 2 or 3, got {self.lanes}")

    def radius(self, size: SizeClass) -> int:
        """Radius in pixels of a size class."""
        return self.radius_small if size == "small" else self.radius_large

    @property
    def margin(self) -> int:
        """``radius_large + 1``: a centre at least this far from every edge puts any entity fully inside
        the canvas without touching its border pixels; a centre this far beyond an edge hides it."""
        return self.radius_large + 1


DEFAULT_WORLD = WorldConfig()


@dataclass(frozen=True)
class Traits:
    """Hidden identity traits of an entity (never named in prompts).

    Attributes:
        size: ``"small"`` or ``"large"`` (radius from :class:`WorldConfig`).
        marking: ``"none"``, ``"dot"`` (a disc at the shape's centre, radius ``max(1, round(r/3))``)
            or ``"stripe"`` (a 3-pixel-high horizontal band through the centre, clipped to the shape).
        marking_colour: a :data:`MARKING_COLOURS` name, or None exactly when ``marking == "none"``.
    """

    size: SizeClass
    marking: MarkingKind = "none"
    marking_colour: Optional[str] = None

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.marking not in MARKINGS:
            raise ValueError(f"marking must be one of {MARKINGS}, got {self.marking!r}")
        if (self.marking == "none") != (self.marking_colour is None):
            raise ValueError("marking_colour must be given exactly when marking is not 'none'")
        if self.marking_colour is not None and self.marking_colour not in MARKING_COLOURS:
            raise ValueError(f"marking_colour must be one of {tuple(MARKING_COLOURS)}, got {self.marking_colour!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "marking": self.marking, "marking_colour": self.marking_colour}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Traits:
        return cls(data["size"], data.get("marking", "none"), data.get("marking_colour"))


@dataclass(frozen=True)
class Entity:
    """One entity of an episode. Its id is its index in :attr:`Episode.entities`.

    Attributes:
        shape, colour: the kind, named in prompts (``colour`` is an :data:`ENTITY_COLOURS` name).
        traits: the hidden identity traits it is drawn with.
        home: ``(x, y)`` where ``enter`` and ``return`` bring it; the coordinate across the motion is
            kept, so an entity entering from the left slides in along the row ``y = home[1]``.
    """

    shape: Shape
    colour: str
    traits: Traits
    home: tuple[float, float]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.colour not in ENTITY_COLOURS:
            raise ValueError(f"colour must be one of {tuple(ENTITY_COLOURS)}, got {self.colour!r}")

    @property
    def kind(self) -> tuple[str, str]:
        """``(colour, shape)``: what prompts can say about the entity."""
        return (self.colour, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "traits": self.traits.to_dict(), "home": list(self.home)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Entity:
        return cls(data["shape"], data["colour"], Traits.from_dict(data["traits"]), tuple(data["home"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Segment:
    """One scripted step: ``entity`` performs ``action`` for ``frames`` frames.

    Actions and their ``direction``:

    * ``enter`` — first appearance, sliding in from the side ``direction`` to the entity's home;
    * ``move`` — ``move_speed`` px/frame towards ``direction``; must stay fully inside the frame;
    * ``stay`` — keep still (no direction);
    * ``leave`` — slide out of the frame through the side ``direction``, ending just off-canvas;
    * ``return`` — come back from the side ``direction`` to the home, after having left;
    * ``wait`` — nobody acts (``entity`` is None, no direction); whoever is on stage keeps still.

    ``direction`` is ``left``, ``right``, ``up`` or ``down``; ``top``/``bottom`` are accepted for the
    sides and stored as ``up``/``down``. Position at the segment's frame ``i`` (0-based) is the linear
    interpolation ``start + (end - start) * (i + 1) / frames``, so the last frame reaches the end.
    """

    action: Action
    entity: Optional[int]
    direction: Optional[Direction]
    frames: int

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")
        if isinstance(self.frames, bool) or not isinstance(self.frames, (int, np.integer)) or self.frames < 1:
            raise ValueError(f"a segment lasts at least 1 frame, got {self.frames!r}")
        object.__setattr__(self, "frames", int(self.frames))
        if self.direction is not None:
            direction = _DIRECTION_ALIASES.get(self.direction, self.direction)
            if direction not in DIRECTIONS:
                raise ValueError(f"direction must be one of {DIRECTIONS} (or top/bottom), got {self.direction!r}")
            object.__setattr__(self, "direction", direction)
        needs_direction = self.action in ("enter", "move", "leave", "return")
        if needs_direction and self.direction is None:
            raise ValueError(f"a {self.action!r} segment needs a direction")
        if not needs_direction and self.direction is not None:
            raise ValueError(f"a {self.action!r} segment takes no direction")
        if (self.action == "wait") != (self.entity is None):
            raise ValueError("'wait' segments have no entity; every other action needs one")

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "entity": self.entity, "direction": self.direction, "frames": self.frames}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Segment:
        return cls(data["action"], data.get("entity"), data.get("direction"), data["frames"])


@dataclass(frozen=True)
class Trajectory:
    """Scripted positions, a function of the script and world geometry only (not of hidden traits).

    Attributes:
        centres: ``(T, E, 2)`` float64 ``(x, y)`` of each entity's centre; NaN before it first enters.
        inside: ``(T, E)`` bool: the entity is fully inside the canvas, touching no border pixel,
            whatever its size (centre at least :attr:`WorldConfig.margin` from every edge).
        outside: ``(T, E)`` bool: no pixel of the entity is on the canvas, whatever its size (not
            entered yet, or left). Frames neither inside nor outside are partly visible.
        segment: ``(T,)`` int index of the segment each frame belongs to.
    """

    centres: np.ndarray
    inside: np.ndarray
    outside: np.ndarray
    segment: np.ndarray

    @property
    def settled(self) -> np.ndarray:
        """``(T,)`` bool: every entity is either fully inside or fully outside."""
        return np.all(self.inside | self.outside, axis=1)


@dataclass(frozen=True)
class Episode:
    """A scripted episode: entities, segments, background colour and world geometry.

    The script is validated on construction (entities enter once before anything else, return only
    after leaving, never move out of the frame, ...); invalid scripts raise ``ValueError``.

    Attributes:
        entities: the cast; entity ``k`` has id ``k`` and label ``k + 1`` in the ground truth.
        segments: the script, played in order.
        background: a :data:`BACKGROUND_COLOURS` name.
        config: world geometry.
        seed: the seed the episode was drawn from (provenance only; rendering is deterministic).
    """

    entities: tuple[Entity, ...]
    segments: tuple[Segment, ...]
    background: str
    config: WorldConfig = field(default=DEFAULT_WORLD)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "entities", tuple(self.entities))
        object.__setattr__(self, "segments", tuple(self.segments))
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"background must be one of {tuple(BACKGROUND_COLOURS)}, got {self.background!r}")
        if not self.entities:
            raise ValueError("an episode needs at least one entity")
        if not self.segments:
            raise ValueError("an episode needs at least one segment")
        for entity in self.entities:
            x, y = entity.home
            if not _inside(self.config, x, y):
                raise ValueError(f"home {entity.home} is too close to the edge; keep it {self.config.margin} px inside")
        _ = self.trajectory  # validates the script

    @property
    def total_frames(self) -> int:
        return sum(segment.frames for segment in self.segments)

    @property
    def segment_starts(self) -> list[int]:
        """First frame of every segment (and, last, the total frame count)."""
        starts = [0]
        for segment in self.segments:
            starts.append(starts[-1] + segment.frames)
        return starts

    @cached_property
    def trajectory(self) -> Trajectory:
        """The scripted positions (computed once; arrays are read-only)."""
        return compute_trajectory(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (inverse of :meth:`from_dict`)."""
        c = self.config
        return {
            "background": self.background,
            "seed": self.seed,
            "config": {"width": c.width, "height": c.height, "fps": c.fps, "radius_small": c.radius_small,
                       "radius_large": c.radius_large, "move_speed": c.move_speed},
            "entities": [entity.to_dict() for entity in self.entities],
            "segments": [segment.to_dict() for segment in self.segments],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Episode:
        return cls(
            entities=tuple(Entity.from_dict(e) for e in data["entities"]),
            segments=tuple(Segment.from_dict(s) for s in data["segments"]),
            background=data["background"],
            config=WorldConfig(**data.get("config", {})),
            seed=data.get("seed"),
        )


# --------------------------------------------------------------------------------------------------
# Kinematics


def _inside(config: WorldConfig, x: float, y: float) -> bool:
    m = config.margin
    return m <= x <= config.width - 1 - m and m <= y <= config.height - 1 - m


def _offscreen(config: WorldConfig, side: Direction, home: tuple[float, float]) -> tuple[float, float]:
    """The point just beyond ``side`` on the line through ``home`` perpendicular to that side."""
    m = config.margin
    x, y = home
    if side == "left":
        return (-float(m), y)
    if side == "right":
        return (float(config.width - 1 + m), y)
    if side == "up":
        return (x, -float(m))
    return (x, float(config.height - 1 + m))


def compute_trajectory(episode: Episode) -> Trajectory:
    """Play the script and return every entity's centre per frame (see :class:`Trajectory`).

    Raises:
        ValueError: if the script is inconsistent: an entity acts before entering, enters twice,
            returns without having left, moves or stays while off stage, or a move would take it
            closer than :attr:`WorldConfig.margin` to an edge.
    """
    config = episode.config
    n_entities = len(episode.entities)
    total = episode.total_frames
    centres = np.full((total, n_entities, 2), np.nan)  # (T, E, 2)
    segment_of = np.zeros(total, dtype=np.int64)  # (T,)
    position: list[Optional[tuple[float, float]]] = [None] * n_entities
    state = ["unborn"] * n_entities  # unborn -> on -> gone -> on -> ...
    frame = 0
    for index, segment in enumerate(episode.segments):
        where = f"segment {index} ({segment.action})"
        start_end: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {}
        e = segment.entity
        if e is not None:
            if not 0 <= e < n_entities:
                raise ValueError(f"{where}: entity {e} does not exist (the episode has {n_entities})")
            action, direction = segment.action, segment.direction
            home = episode.entities[e].home
            if action == "enter" and state[e] != "unborn":
                raise ValueError(f"{where}: entity {e} has already entered; use 'return' after it leaves")
            if action == "return" and state[e] != "gone":
                raise ValueError(f"{where}: entity {e} can only return after leaving the frame")
            if action in ("move", "stay", "leave") and state[e] != "on":
                raise ValueError(f"{where}: entity {e} is not in the frame")
            if action in ("enter", "return"):
                assert direction is not None
                start_end[e] = (_offscreen(config, direction, home), home)
                state[e] = "on"
            elif action == "move":
                assert direction is not None and position[e] is not None
                dx, dy = _UNIT[direction]
                x0, y0 = position[e]
                step = config.move_speed * segment.frames
                end = (x0 + dx * step, y0 + dy * step)
                if not _inside(config, *end):
                    raise ValueError(f"{where}: entity {e} would end at {end}, too close to the edge; "
                                     f"use 'leave' to exit the frame")
                start_end[e] = (position[e], end)
            elif action == "leave":
                assert direction is not None and position[e] is not None
                start_end[e] = (position[e], _offscreen(config, direction, position[e]))
                state[e] = "gone"
        for k in range(n_entities):
            rows = slice(frame, frame + segment.frames)
            if k in start_end:
                (x0, y0), (x1, y1) = start_end[k]
                fraction = np.arange(1, segment.frames + 1) / segment.frames  # (F,)
                centres[rows, k, 0] = x0 + (x1 - x0) * fraction
                centres[rows, k, 1] = y0 + (y1 - y0) * fraction
                position[k] = (x1, y1)
            elif position[k] is not None:
                centres[rows, k] = position[k]
        segment_of[frame : frame + segment.frames] = index
        frame += segment.frames

    m = config.margin
    x, y = centres[..., 0], centres[..., 1]  # (T, E) each
    with np.errstate(invalid="ignore"):
        inside = (x >= m) & (x <= config.width - 1 - m) & (y >= m) & (y <= config.height - 1 - m)
        reach = config.radius_large + 0.5  # largest extent of any entity from its centre
        outside = (x <= -reach) | (x >= config.width - 1 + reach) | (y <= -reach) | (y >= config.height - 1 + reach)
    outside |= np.isnan(x)
    for array in (centres, inside, outside, segment_of):
        array.setflags(write=False)
    return Trajectory(centres=centres, inside=inside, outside=outside, segment=segment_of)


# --------------------------------------------------------------------------------------------------
# Rasterisation


def _polygon_mask(px: np.ndarray, py: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even–odd point-in-polygon test. ``px, py``: (h, w) pixel centres; ``vertices``: (V, 2) (x, y)."""
    inside = np.zeros(px.shape, dtype=bool)
    count = len(vertices)
    for i in range(count):
        xi, yi = vertices[i]
        xj, yj = vertices[i - 1]
        if yi == yj:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (yi > py) != (yj > py)
        x_at = xi + (xj - xi) * (py - yi) / (yj - yi)
        inside ^= crosses & (px < x_at)
    return inside


def _star_vertices(cx: float, cy: float, outer: float) -> np.ndarray:
    """(10, 2) vertices of an apex-up five-pointed star, alternating outer and inner."""
    angles = np.pi / 2 + np.arange(10) * np.pi / 5  # (10,)
    radii = np.where(np.arange(10) % 2 == 0, outer, outer * STAR_INNER_RATIO)
    return np.stack([cx + radii * np.cos(angles), cy - radii * np.sin(angles)], axis=1)


def marking_anchor(shape: Shape, radius: int, centre: tuple[float, float]) -> tuple[float, float]:
    """Where a marking is centred: the shape's centre, or the centroid of the triangle."""
    cx, cy = centre
    if shape == "triangle":
        return (cx, cy + (radius + 0.5) / 3.0)
    return (cx, cy)


def _window(centre: tuple[float, float], reach: float) -> tuple[int, int, int, int]:
    """Integer pixel window ``(x0, y0, x1, y1)`` (exclusive ends) covering ``centre ± reach``."""
    cx, cy = centre
    return (int(np.floor(cx - reach)), int(np.floor(cy - reach)), int(np.ceil(cx + reach)) + 1, int(np.ceil(cy + reach)) + 1)


def rasterise(shape: Shape, radius: int, centre: tuple[float, float], traits: Optional[Traits] = None
              ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Pixels of an entity in a local window, unclipped (the window may extend beyond any canvas).

    Args:
        shape: the shape.
        radius: ``r`` in pixels; the shape spans the pixel centres within ``R = r + 0.5``.
        centre: ``(x, y)``.
        traits: if given, its marking is rasterised too.

    Returns:
        ``(body, marking, (x0, y0))``: two ``(h, w)`` bool masks — the whole shape, and the marking
        pixels (a subset of the shape) — and the canvas coordinates of the window's top-left pixel.
    """
    outer = radius + 0.5
    x0, y0, x1, y1 = _window(centre, outer)
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64)  # (h, w) each
    cx, cy = centre
    dx, dy = px - cx, py - cy
    if shape == "circle":
        body = dx * dx + dy * dy < outer * outer
    elif shape == "square":
        body = (np.abs(dx) < outer) & (np.abs(dy) < outer)
    elif shape == "triangle":
        vertices = np.array([[cx, cy - outer], [cx + outer, cy + outer], [cx - outer, cy + outer]])
        body = _polygon_mask(px, py, vertices)
    elif shape == "star":
        body = _polygon_mask(px, py, _star_vertices(cx, cy, outer))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    marking = np.zeros_like(body)
    if traits is not None and traits.marking != "none":
        ax, ay = marking_anchor(shape, radius, centre)
        if traits.marking == "dot":
            dot = max(1, round(radius / 3)) + 0.5
            marking = (px - ax) ** 2 + (py - ay) ** 2 < dot * dot
        else:
            marking = np.abs(py - ay) < STRIPE_HALF_HEIGHT
        marking &= body
    return body, marking, (x0, y0)


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class GroundTruth:
    """Per-frame ground truth of a rendered episode (never given to the analyser).

    Attributes:
        labels: ``(T, H, W)`` int16 label map: 0 background, ``k + 1`` entity ``k`` (the top-most
            one where entities overlap; later ids are drawn on top).
        entity_ids: ``(E,)`` ids, ``k`` for label ``k + 1``.
        visible: ``(T, E)`` bool: some pixel of the entity is on the canvas.
        complete: ``(T, E)`` bool: the entity is drawn whole, touching no border pixel.
        centres: ``(T, E, 2)`` scripted ``(x, y)`` centres (NaN before the first entrance).
        traits: per frame, the :class:`Traits` each entity is drawn with (length T, tuples of E).
    """

    labels: np.ndarray
    entity_ids: np.ndarray
    visible: np.ndarray
    complete: np.ndarray
    centres: np.ndarray
    traits: tuple[tuple[Traits, ...], ...]


@dataclass(frozen=True)
class RenderedEpisode:
    """Frames ``uint8 (T, H, W, 3)`` of an episode, its ground truth, and the episode itself."""

    episode: Episode
    frames: np.ndarray
    truth: GroundTruth


def render_episode(episode: Episode, *, return_traits: Optional[Mapping[int, Traits]] = None) -> RenderedEpisode:
    """Draw an episode. Deterministic: the same episode always gives identical arrays.

    Args:
        episode: the script.
        return_traits: optional ``{entity id: traits}`` to draw that entity with from the first frame
            of its first ``return`` segment on, instead of its own traits. This builds *negative
            controls* — videos in which identity is NOT preserved (e.g. the returning entity wears
            another entity's traits) — to check that the metrics can fail.

    Returns:
        The frames and the ground truth.
    """
    config = episode.config
    trajectory = episode.trajectory
    total, height, width = episode.total_frames, config.height, config.width
    n_entities = len(episode.entities)
    overrides = dict(return_traits or {})
    for k in overrides:
        if not 0 <= k < n_entities:
            raise ValueError(f"return_traits names entity {k}, but the episode has {n_entities}")
    switch_frame = {k: first_return_frame(episode, k) for k in overrides}

    frames = np.empty((total, height, width, 3), dtype=np.uint8)
    frames[:] = np.array(BACKGROUND_COLOURS[episode.background], dtype=np.uint8)
    labels = np.zeros((total, height, width), dtype=np.int16)
    visible = np.zeros((total, n_entities), dtype=bool)
    complete = np.zeros((total, n_entities), dtype=bool)
    traits_per_frame: list[tuple[Traits, ...]] = []
    for t in range(total):
        drawn: list[Traits] = []
        for k, entity in enumerate(episode.entities):
            traits = entity.traits
            if k in overrides and switch_frame[k] is not None and t >= switch_frame[k]:
                traits = overrides[k]
            drawn.append(traits)
            x, y = trajectory.centres[t, k]
            if np.isnan(x):
                continue
            body, marking, (x0, y0) = rasterise(entity.shape, config.radius(traits.size), (x, y), traits)
            h, w = body.shape
            # Clip the local window to the canvas.
            cx0, cy0 = max(x0, 0), max(y0, 0)
            cx1, cy1 = min(x0 + w, width), min(y0 + h, height)
            if cx0 >= cx1 or cy0 >= cy1:
                continue
            local = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
            canvas = (t, slice(cy0, cy1), slice(cx0, cx1))
            body_in, marking_in = body[local], marking[local]  # (h', w') each
            if not body_in.any():
                continue
            visible[t, k] = True
            rows, cols = np.nonzero(body)
            complete[t, k] = bool(
                rows.min() + y0 >= 1 and rows.max() + y0 <= height - 2 and cols.min() + x0 >= 1 and cols.max() + x0 <= width - 2
            )
            labels[canvas][body_in] = k + 1
            patch = frames[canvas]  # (h', w', 3) view
            patch[body_in] = ENTITY_COLOURS[entity.colour]
            if traits.marking_colour is not None:
                patch[marking_in] = MARKING_COLOURS[traits.marking_colour]
        traits_per_frame.append(tuple(drawn))
    truth = GroundTruth(labels=labels, entity_ids=np.arange(n_entities), visible=visible, complete=complete,
                        centres=np.array(trajectory.centres), traits=tuple(traits_per_frame))
    return RenderedEpisode(episode=episode, frames=frames, truth=truth)


def first_return_frame(episode: Episode, entity: int = 0) -> Optional[int]:
    """The first video frame of ``entity``'s first ``return`` segment (the protagonist's by default), or None."""
    for start, segment in zip(episode.segment_starts, episode.segments):
        if segment.action == "return" and segment.entity == entity:
            return start
    return None


# --------------------------------------------------------------------------------------------------
# Random episodes

FIRST_ENTER_FRAMES = 21
"""Frames of the first entrance in :func:`exit_return_episode`: 21 = 9 + 12 is a chunk boundary both for a
Wan2.1-style 4× temporal VAE (first chunk 9 frames, later ones 12) and for the miniature (3-frame chunks),
so this switch (and, with ``gap_frames`` a multiple of 12, every later one) falls where the engine switches
prompts."""

STEP_FRAMES = 12
"""Frames of every later segment of :func:`exit_return_episode` (one 4×-temporal chunk, four miniature chunks)."""


def draw_traits(rng: np.random.Generator) -> Traits:
    """Uniform random traits: size from :data:`SIZES`, marking kind from :data:`MARKINGS`, and a
    uniform marking colour when marked. Chance that two independent draws agree: 1/2 · 2/9 = 1/9."""
    size = SIZES[int(rng.integers(len(SIZES)))]
    marking = MARKINGS[int(rng.integers(len(MARKINGS)))]
    colour = None if marking == "none" else tuple(MARKING_COLOURS)[int(rng.integers(len(MARKING_COLOURS)))]
    return Traits(size, marking, colour)


def _different_traits(rng: np.random.Generator, other: Traits) -> Traits:
    """Random traits differing from ``other`` in size AND in marking (kind or colour)."""
    size: SizeClass = "large" if other.size == "small" else "small"
    options = [(kind, colour) for kind in MARKINGS for colour in ((None,) if kind == "none" else tuple(MARKING_COLOURS))
               if (kind, colour) != (other.marking, other.marking_colour)]
    kind, colour = options[int(rng.integers(len(options)))]
    return Traits(size, kind, colour)


def lane_rows(config: WorldConfig, lanes: Optional[int] = None) -> list[int]:
    """Rows (y) of ``lanes`` (default ``config.lanes``) horizontal lanes, evenly spread between the
    margins (10, 32 and 53 on a 64-pixel canvas): large entities in neighbouring lanes keep at least 2
    free rows between them."""
    lanes = config.lanes if lanes is None else lanes
    low, high = config.margin, config.height - 1 - config.margin
    return [int(round(low + (high - low) * i / (lanes - 1))) for i in range(lanes)]


LANE_NAMES: dict[int, tuple[str, ...]] = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
"""Caption names of the lanes (:func:`lane_rows`, top to bottom), by lane count."""


def lane_name(config: WorldConfig, y: float) -> str:
    """The name of the lane nearest to row ``y``."""
    rows = lane_rows(config)
    return LANE_NAMES[config.lanes][int(np.argmin([abs(y - r) for r in rows]))]


@dataclass(frozen=True)
class WorldSpec:
    """What a world's random episodes draw from (:func:`exit_return_episode`), and its geometry.

    Attributes:
        name: the world's name (``slotgen train-miniature --world NAME``).
        config: geometry and caption style (lanes, lane and trait naming).
        backgrounds, shapes, colours: the kinds an episode draws from (subsets of the palette/shapes).
        traits: the hidden trait values an entity draws from, uniformly; None: :func:`draw_traits`
            (every size × marking, chance of agreement 1/9).
        companions_centred: companions' home column is the centre (else drawn at random).
    """

    name: str
    config: WorldConfig
    backgrounds: tuple[str, ...] = tuple(BACKGROUND_COLOURS)
    shapes: tuple[Shape, ...] = SHAPES
    colours: tuple[str, ...] = tuple(ENTITY_COLOURS)
    traits: Optional[tuple[Traits, ...]] = None
    companions_centred: bool = False

    def __post_init__(self) -> None:
        for values, known, what in ((self.backgrounds, BACKGROUND_COLOURS, "background"), (self.shapes, SHAPES, "shape"),
                                    (self.colours, ENTITY_COLOURS, "colour")):
            if not values or any(v not in known for v in values):
                raise ValueError(f"world {self.name!r}: {what}s must be a non-empty subset of {tuple(known)}, got {values}")
        if self.traits is not None and len(set(self.traits)) < 2:
            raise ValueError(f"world {self.name!r}: needs at least 2 distinct trait values, got {self.traits}")

    @property
    def chance(self) -> float:
        """Probability that two independent trait draws agree (identity recall of a memoryless model)."""
        return 1.0 / 9.0 if self.traits is None else 1.0 / len(set(self.traits))


STANDARD_WORLD = WorldSpec("standard", DEFAULT_WORLD)
"""The full shape world: 4 backgrounds, 4 shapes, 4 colours, 10 trait combinations, 3 unnamed lanes."""

REDUCED_WORLD = WorldSpec(
    "reduced",
    WorldConfig(radius_small=7, radius_large=11, lanes=2, name_lanes=True, introduce_traits=True),
    backgrounds=("black",),
    shapes=("circle", "square"),
    colours=("red", "green", "yellow"),
    traits=(Traits("large"), Traits("large", "dot", "cyan"), Traits("large", "dot", "pink")),
    companions_centred=True,
)
"""A world a 2-core CPU can teach the miniature (docs/WORLD.md, "The reduced world"): one background,
2 shapes, 3 colours, big entities (r = 11), one hidden trait with 3 values (no dot, a cyan dot, a pink
dot), 2 named lanes, and the traits named only in the caption of the first entrance: every caption
decides its first frame, and after an absence only memory can tell the traits (chance 1/3)."""

WORLDS: dict[str, WorldSpec] = {w.name: w for w in (STANDARD_WORLD, REDUCED_WORLD)}
"""Worlds by name."""


def world_named(name: str) -> WorldSpec:
    """The world called ``name`` (``ValueError`` naming the known ones otherwise)."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; expected one of {', '.join(WORLDS)}")
    return WORLDS[name]


def _other_traits(rng: np.random.Generator, world: WorldSpec, other: Traits) -> Traits:
    """Traits for a look-alike companion: :func:`_different_traits` in the standard trait set, else a
    uniform choice among the world's other trait values."""
    if world.traits is None:
        return _different_traits(rng, other)
    options = [t for t in dict.fromkeys(world.traits) if t != other]
    return options[int(rng.integers(len(options)))]


def exit_return_episode(seed: int, gap_frames: int, n_entities: int = 1, similar: bool = False, *,
                        config: Optional[WorldConfig] = None, world: WorldSpec = STANDARD_WORLD) -> Episode:
    """The benchmark's standard episode: entity 0 appears, moves, leaves, is absent, and returns.

    Script (entity 0 is the *protagonist*; others are companions in their own lanes)::

        enter 0 from left/right           21 frames (FIRST_ENTER_FRAMES)
        enter k from left/right           12 frames each, k = 1 .. n_entities-1
        move 0 left/right                 12 frames (12 px at the default speed)
        leave 0 to left/right             12 frames
        wait                              gap_frames frames (omitted when 0): 0 is off stage
        return 0 from the side it left    12 frames
        stay 0                            12 frames (the window after the return)

    Everything random is drawn from ``numpy.random.default_rng(seed)``: background, kinds, hidden
    traits (:func:`draw_traits`), lanes, companions' home columns and the sides and direction.

    Args:
        seed: the episode's seed.
        gap_frames: frames between the end of the leave and the start of the return (at least 0).
            A multiple of 12 keeps every prompt switch on a chunk boundary (see FIRST_ENTER_FRAMES).
        n_entities: 1–3 entities on distinct lanes. Without ``similar`` all have distinct colours.
        similar: make entity 1 the same shape and colour as entity 0 with traits differing in size
            and marking (the attribute-leakage test; in a world with its own trait values: other
            traits); needs ``n_entities >= 2``.
        config: world geometry (default: the world's).
        world: what the episode draws from (:data:`STANDARD_WORLD` by default; :data:`REDUCED_WORLD`).
            The standard world draws exactly as it always did, so its seeds name the same episodes.
    """
    config = world.config if config is None else config
    if not 1 <= n_entities <= config.lanes:
        raise ValueError(f"n_entities must be 1 to {config.lanes} (one per lane), got {n_entities}")
    if similar and n_entities < 2:
        raise ValueError("similar=True needs at least 2 entities")
    if isinstance(gap_frames, bool) or gap_frames < 0:
        raise ValueError(f"gap_frames must be at least 0, got {gap_frames!r}")
    rng = np.random.default_rng(seed)
    background = world.backgrounds[int(rng.integers(len(world.backgrounds)))]
    n_colours = n_entities - 1 if similar else n_entities
    if n_colours > len(world.colours):
        raise ValueError(f"world {world.name!r} has {len(world.colours)} colours, too few for {n_colours} kinds")
    colours = [world.colours[int(i)] for i in rng.permutation(len(world.colours))[:n_colours]]
    shapes = [world.shapes[int(rng.integers(len(world.shapes)))] for _ in range(n_colours)]
    if similar:
        colours.insert(1, colours[0])
        shapes.insert(1, shapes[0])
    if world.traits is None:
        traits = [draw_traits(rng) for _ in range(n_entities)]
    else:
        traits = [world.traits[int(rng.integers(len(world.traits)))] for _ in range(n_entities)]
    if similar:
        traits[1] = _other_traits(rng, world, traits[0])
    rows = lane_rows(config)
    lanes = [rows[int(i)] for i in rng.permutation(len(rows))[:n_entities]]
    centre_x = float(config.width // 2)
    homes: list[tuple[float, float]] = [(centre_x, float(lanes[0]))]
    for k in range(1, n_entities):
        x = int(rng.integers(config.margin, config.width - config.margin)) if not world.companions_centred else centre_x
        homes.append((float(x), float(lanes[k])))
    sides: list[Direction] = ["left" if rng.integers(2) == 0 else "right" for _ in range(n_entities)]
    move: Direction = "left" if rng.integers(2) == 0 else "right"
    exit_side: Direction = "left" if rng.integers(2) == 0 else "right"

    entities = tuple(Entity(shapes[k], colours[k], traits[k], homes[k]) for k in range(n_entities))
    segments = [Segment("enter", 0, sides[0], FIRST_ENTER_FRAMES)]
    segments += [Segment("enter", k, sides[k], STEP_FRAMES) for k in range(1, n_entities)]
    segments += [Segment("move", 0, move, STEP_FRAMES), Segment("leave", 0, exit_side, STEP_FRAMES)]
    if gap_frames:
        segments.append(Segment("wait", None, None, int(gap_frames)))
    segments += [Segment("return", 0, exit_side, STEP_FRAMES), Segment("stay", 0, None, STEP_FRAMES)]
    return Episode(entities=entities, segments=tuple(segments), background=background, config=config, seed=seed)


def with_entity_traits(episode: Episode, traits: Mapping[int, Traits]) -> Episode:
    """A copy of ``episode`` whose entities ``k`` in ``traits`` carry the given traits throughout."""
    entities = tuple(replace(e, traits=traits.get(k, e.traits)) for k, e in enumerate(episode.entities))
    return replace(episode, entities=entities)

