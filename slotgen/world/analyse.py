"""Analyse rendered or generated world videos: detect entities, then score identity and compliance.

The analyser sees only the frames and the episode *script* (what the prompts asked for, plus the
world's palette and geometry); never the ground truth. Hidden traits are not read from the script:
they are measured from the pixels.

Pipeline (all deterministic numpy):

1. **Colour segmentation** (:func:`classify_pixels`): each pixel takes the nearest :data:`PALETTE`
   colour if it is within :data:`MAX_COLOUR_DISTANCE` (Euclidean RGB), else "unknown" (−1).
2. **Components** (:func:`label_components`): for every entity colour ``c``, the *body* mask is
   ``class == c``, plus marking-colour pixels near it, plus unknown pixels with at least
   :data:`HOLE_NEIGHBOURS` of their 8 neighbours in the body (a generated frame's blended edges and
   marking rims). Body pixels whose 1-pixel dilations touch form one component (per frame), so a body
   cut by a seam of stray pixels stays one detection. A component with at least
   :data:`MIN_DETECTION_PIXELS` pixels of colour ``c`` is a detection of colour ``c`` (markings sit
   inside the body, so they belong to it; a marking-only blob is dropped).
3. **Features** of a *complete* detection (one touching no border pixel; a detection cut by the
   border gets no shape or traits):

   * shape and size class (:func:`match_template`): the world's own raster of every shape × size
     class, aligned on the detection's centroid and moved by up to :data:`TEMPLATE_SEARCH` px in
     half-pixel steps; the best intersection-over-union wins. (Fill and solidity thresholds with an
     area-based size are exact on clean renders, but a few stray edge pixels swing them: ground truth
     projected onto a rank-128 patch basis, which looks unchanged, scores 0.04–0.41 presence with them.
     ``tests/test_world.py`` checks the projected truth scores ≥ 0.9 with templates.)
   * fill ratio and solidity are still measured and reported on each :class:`Detection`.
   * marking: the marking colour with most pixels in the detection, if at least
     :data:`MIN_MARKING_PIXELS`; a stripe if those pixels' box is at least :data:`STRIPE_ASPECT`
     times wider than high, else a dot; otherwise ``none``.

4. **Association**: on each frame, complete detections of a kind (colour, shape) are matched to the
   script's entities of that kind by greedy nearest distance to the scripted centres (the script's
   positions do not depend on hidden traits, see :func:`slotgen.world.scene.compute_trajectory`).
5. **Metrics** (:func:`analyse_episode`), defined in docs/WORLD.md and in :class:`EpisodeReport`.

Aggregation over episodes uses percentile bootstrap intervals (:func:`bootstrap_ci`,
:func:`paired_bootstrap`, :func:`aggregate`).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np

from slotgen.world.scene import (
    ENTITY_COLOURS,
    MARKING_COLOURS,
    PALETTE,
    SHAPES,
    SIZES,
    Episode,
    Shape,
    Traits,
    WorldConfig,
    direction_vector,
    rasterise,
)

# --------------------------------------------------------------------------------------------------
# Constants (fixed before looking at any results; see docs/WORLD.md)

PALETTE_NAMES: tuple[str, ...] = tuple(PALETTE)
"""Class index ``i`` of :func:`classify_pixels` is ``PALETTE_NAMES[i]``; −1 is unknown."""

MAX_COLOUR_DISTANCE = 50.0
"""RGB distance within which a pixel takes its nearest palette colour (palette colours are ≥ 110
apart, so at most one colour is that close)."""

MIN_DETECTION_PIXELS = 10
"""Pixels of its main colour a component needs to count as a detection."""

MIN_MARKING_PIXELS = 3
"""Pixels of a marking colour a detection needs to count as marked."""

STRIPE_ASPECT = 2.0
"""A marking whose pixel box is at least this many times wider than high is a stripe, else a dot."""

HOLE_NEIGHBOURS = 5
"""An unknown pixel with at least this many of its 8 neighbours in an entity's body joins the body."""

TEMPLATE_SEARCH = 0.5
"""Pixels (in half-pixel steps) a template may move from the centroid alignment in :func:`match_template`."""

TRAIT_WINDOW = 5
"""Frames measured on each side of an absence (the majority needs more than half of them)."""

MOTION_LAG = 4
"""Frames back (at most; not before the segment's previous frame) for the centroid motion test."""

MIN_MOTION_PIXELS = 0.5
"""Displacement along the prompted direction the motion test requires."""

_ENTITY_CLASS = {name: PALETTE_NAMES.index(name) for name in ENTITY_COLOURS}
_MARKING_CLASS = {name: PALETTE_NAMES.index(name) for name in MARKING_COLOURS}
_PALETTE_RGB = np.array([PALETTE[name] for name in PALETTE_NAMES], dtype=np.int32)  # (P, 3)


# --------------------------------------------------------------------------------------------------
# Segmentation


def classify_pixels(frames: np.ndarray, max_distance: float = MAX_COLOUR_DISTANCE) -> np.ndarray:
    """Nearest palette colour per pixel.

    Args:
        frames: ``uint8 (T, H, W, 3)``.
        max_distance: pixels farther than this from every palette colour are unknown.

    Returns:
        ``int8 (T, H, W)``: index into :data:`PALETTE_NAMES`, or −1 for unknown.
    """
    frames = _check_frames(frames)
    pixels = frames.reshape(-1, 3).astype(np.float32)  # (N, 3)
    palette = _PALETTE_RGB.astype(np.float32)  # (P, 3)
    # |f - p|² = |f|² - 2 f·p + |p|²; every term is an integer below 2**24, so float32 is exact.
    dist2 = (pixels * pixels).sum(axis=1, keepdims=True) - 2.0 * pixels @ palette.T + (palette * palette).sum(axis=1)
    best = dist2.argmin(axis=1)  # (N,)
    close = np.take_along_axis(dist2, best[:, None], axis=1)[:, 0] <= max_distance * max_distance
    out = np.where(close, best, -1).astype(np.int8).reshape(frames.shape[:3])
    return out


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean ``(T, H, W)`` volume, separately in every frame.

    Returns:
        ``int64 (T, H, W)``: 0 outside the mask; inside, one positive label per component, unique
        across frames (1 + the flat index of one pixel of the component).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (T, H, W), got shape {mask.shape}")
    result = np.zeros(mask.shape, dtype=np.int64)
    rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    if len(rows) == 0:
        return result
    # Work on the bounding box of the mask (entities keep to lanes, so this is often much smaller).
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    local = _label_local(mask[box])  # labels index the cropped volume
    height, width = mask.shape[1:]
    local_h, local_w = local.shape[1:]
    t, rest = np.divmod(local - 1, local_h * local_w)
    y, x = np.divmod(rest, local_w)
    result[box] = np.where(local > 0, 1 + t * height * width + (y + rows[0]) * width + (x + cols[0]), 0)
    return result


def _label_local(mask: np.ndarray) -> np.ndarray:
    """:func:`label_components` on a volume, labels = 1 + flat index into ``mask``."""
    size = mask.size
    big = size + 1
    flat_index = np.arange(1, size + 1, dtype=np.int64).reshape(mask.shape)
    labels = np.where(mask, flat_index, big)  # (T, H, W)
    shifts = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
    while True:
        new = labels.copy()
        for dy, dx in shifts:
            # new[y, x] = min(new[y, x], labels[y - dy, x - dx]) within the frame
            ys = slice(max(dy, 0), labels.shape[1] + min(dy, 0))
            xs = slice(max(dx, 0), labels.shape[2] + min(dx, 0))
            ys_src = slice(max(-dy, 0), labels.shape[1] + min(-dy, 0))
            xs_src = slice(max(-dx, 0), labels.shape[2] + min(-dx, 0))
            np.minimum(new[:, ys, xs], labels[:, ys_src, xs_src], out=new[:, ys, xs])
        new = np.where(mask, new, big)
        # Pointer jumping: a label is 1 + the index of a pixel of the same component, so adopting
        # that pixel's label keeps the invariant and halves long chains.
        flat = new.reshape(-1)
        inside = flat < big
        flat[inside] = flat[flat[inside] - 1]
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask, labels, 0)


# --------------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class Detection:
    """One detected entity in one frame.

    Attributes:
        frame: frame index.
        colour: main colour name.
        area: pixels (main colour plus markings inside it).
        centroid: ``(x, y)`` mean pixel position.
        bbox: ``(x0, y0, x1, y1)`` inclusive pixel bounds.
        complete: the detection touches no border pixel (only then are shape and traits measured).
        fill: area / bounding-box area.
        solidity: area / convex-hull area (NaN when incomplete: not needed).
        shape: shape class, or None when incomplete.
        traits: measured hidden traits, or None when incomplete.
    """

    frame: int
    colour: str
    area: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    complete: bool
    fill: float
    solidity: float
    shape: Optional[Shape]
    traits: Optional[Traits]

    @property
    def kind(self) -> tuple[str, Optional[Shape]]:
        return (self.colour, self.shape)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of ``(N, 2)`` points (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def chain(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for px, py in points:
            while len(out) >= 2:
                (ox, oy), (ax, ay) = out[-2], out[-1]
                if (ax - ox) * (py - oy) - (ay - oy) * (px - ox) > 0:
                    break
                out.pop()
            out.append((px, py))
        return out

    lower, upper = chain(pts), chain(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1])  # (V, 2) counter-clockwise
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _solidity(ys: np.ndarray, xs: np.ndarray) -> float:
    """area / convex-hull area of a pixel set given in raster order (sorted by y, then x)."""
    # Only each row's extreme pixels can contribute hull corners.
    row_start = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])  # (rows,)
    row_end = np.r_[row_start[1:], len(ys)] - 1
    rows = ys[row_start].astype(np.float64)
    left, right = xs[row_start] - 0.5, xs[row_end] + 0.5
    corners = np.concatenate([
        np.stack([left, rows - 0.5], 1), np.stack([left, rows + 0.5], 1),
        np.stack([right, rows - 0.5], 1), np.stack([right, rows + 0.5], 1),
    ])  # (4·rows, 2)
    hull = _hull_area(corners)
    return len(ys) / hull if hull > 0 else 0.0


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """``(T, H, W)`` count of each pixel's 8 neighbours inside ``mask`` (within each frame)."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1), (1, 1)))
    height, width = mask.shape[1:]
    total = np.zeros(mask.shape, dtype=np.int8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                total += padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
    return total


@functools.lru_cache(maxsize=None)
def _template(shape: Shape, radius: int, fx: float, fy: float) -> tuple[np.ndarray, int, int, int]:
    """The world's own raster of ``shape`` centred at ``(fx, fy)`` (fractions of a pixel): mask, window
    origin and area. A centre ``(ix + fx, iy + fy)`` has the same mask at origin + ``(ix, iy)``."""
    body, _, (x0, y0) = rasterise(shape, radius, (fx, fy))
    return body, x0, y0, int(body.sum())


def _template_offset(shape: Shape, radius: int) -> float:
    """How far below the raster's centre the shape's pixel centroid lies (only the triangle's does)."""
    return (radius + 0.5) / 3.0 if shape == "triangle" else 0.0


def match_template(ys: np.ndarray, xs: np.ndarray, config: WorldConfig) -> tuple[Shape, str]:
    """Shape and size class of a detection: the world raster that overlaps its pixels best.

    Every shape × size class is rasterised by :func:`slotgen.world.scene.rasterise` (the renderer's
    own code) with its centroid on the detection's, then moved by up to :data:`TEMPLATE_SEARCH` px in
    half-pixel steps; the best intersection-over-union wins (ties: the first in ``SHAPES`` order,
    small before large). Being a whole-mask overlap, it tolerates the stray, missing and blended
    edge pixels of a generated frame that would swing a pixel-count ratio.

    Args:
        ys, xs: ``(N,)`` pixel coordinates of the detection (main colour, markings and filled holes).
        config: the world geometry (the two size classes' radii).

    Returns:
        ``(shape, size)``.
    """
    pad = config.radius_large + 3
    oy, ox = int(ys.min()) - pad, int(xs.min()) - pad  # crop origin (canvas coordinates)
    crop = np.zeros((int(ys.max()) - oy + pad + 1, int(xs.max()) - ox + pad + 1), dtype=bool)  # (h, w)
    crop[ys - oy, xs - ox] = True
    area = len(ys)
    my, mx = float(ys.mean()), float(xs.mean())  # pixel centroid
    n = int(round(2 * TEMPLATE_SEARCH))
    steps = [k / 2 for k in range(-n, n + 1)]  # half-pixel offsets
    xs_grid = sorted({round((mx + d) * 2) / 2 for d in steps})  # the same for every shape and size
    best: tuple[float, Shape, str] = (-1.0, SHAPES[0], SIZES[0])
    for shape in SHAPES:
        for size in SIZES:
            radius = config.radius(size)  # type: ignore[arg-type]
            cy0 = my - _template_offset(shape, radius)
            for cy in sorted({round((cy0 + d) * 2) / 2 for d in steps}):  # half-pixel grid
                iy = math.floor(cy)
                for cx in xs_grid:
                    ix = math.floor(cx)
                    mask, tx, ty, t_area = _template(shape, radius, cx - ix, cy - iy)
                    top, left = ty + iy - oy, tx + ix - ox  # template origin in the crop
                    h, w = mask.shape
                    if top < 0 or left < 0 or top + h > crop.shape[0] or left + w > crop.shape[1]:
                        continue  # the template leaves the padded crop: far off the detection
                    inter = int(np.count_nonzero(crop[top:top + h, left:left + w] & mask))
                    iou = inter / (area + t_area - inter)
                    if iou > best[0]:
                        best = (iou, shape, size)
    return best[1], best[2]


def _marking(classes: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[str, Optional[str]]:
    """Marking kind and colour from the classes of a detection's pixels."""
    best_name, best_count = None, 0
    for name, index in _MARKING_CLASS.items():
        count = int(np.count_nonzero(classes == index))
        if count > best_count:
            best_name, best_count = name, count
    if best_name is None or best_count < MIN_MARKING_PIXELS:
        return "none", None
    hit = classes == _MARKING_CLASS[best_name]
    width = int(xs[hit].max() - xs[hit].min()) + 1
    height = int(ys[hit].max() - ys[hit].min()) + 1
    return ("stripe" if width >= STRIPE_ASPECT * height else "dot"), best_name


def detect_entities(frames: np.ndarray, config: WorldConfig, classes: Optional[np.ndarray] = None
                    ) -> list[list[Detection]]:
    """Detections in every frame (see the module docstring for the method).

    Args:
        frames: ``uint8 (T, H, W, 3)``.
        config: the world geometry (for the size threshold).
        classes: the output of :func:`classify_pixels`, if already computed.

    Returns:
        One list of detections per frame, ordered by colour (palette order) then raster position.
    """
    frames = _check_frames(frames)
    if classes is None:
        classes = classify_pixels(frames)
    total, height, width = classes.shape
    per_frame: list[list[Detection]] = [[] for _ in range(total)]
    marking_any = np.isin(classes, list(_MARKING_CLASS.values()))  # (T, H, W)
    unknown = classes < 0  # (T, H, W)
    for colour, index in _ENTITY_CLASS.items():
        main = classes == index  # (T, H, W)
        if np.count_nonzero(main) < MIN_DETECTION_PIXELS:
            continue
        # Markings lie inside their entity, at most a pixel or two beyond its main colour's extent:
        # add marking pixels near this colour's pixels only, so the labelling can crop to them.
        rows, cols = np.flatnonzero(main.any(axis=(0, 2))), np.flatnonzero(main.any(axis=(0, 1)))
        near = (slice(None), slice(max(rows[0] - 3, 0), rows[-1] + 4), slice(max(cols[0] - 3, 0), cols[-1] + 4))
        body = main.copy()
        body[near] |= marking_any[near]
        # A generator's pixels are never exact: an edge or a marking's rim can blend into colours
        # that classify as unknown, which would punch holes into the body and split it. Unknown
        # pixels mostly surrounded by the body join it, and fragments at most a pixel apart are one
        # detection (components of the body dilated by one pixel, restricted to the body).
        body[near] |= unknown[near] & (_neighbours(body[near]) >= HOLE_NEIGHBOURS)  # body is empty outside near
        labels = label_components(_dilate(body, 1)) * body  # (T, H, W)
        flat = labels.reshape(-1)
        where = np.flatnonzero(flat)  # raster order
        order = np.argsort(flat[where], kind="stable")  # by component, raster order inside one
        where = where[order]
        splits = np.flatnonzero(np.diff(flat[where])) + 1
        flat_classes = classes.reshape(-1)
        for pixels in np.split(where, splits):
            pixel_classes = flat_classes[pixels]
            if np.count_nonzero(pixel_classes == index) < MIN_DETECTION_PIXELS:
                continue
            t, rest = np.divmod(pixels, height * width)
            ys, xs = np.divmod(rest, width)
            frame = int(t[0])
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
            area = len(pixels)
            fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
            complete = x0 >= 1 and y0 >= 1 and x1 <= width - 2 and y1 <= height - 2
            solidity = _solidity(ys, xs) if complete else float("nan")
            shape: Optional[Shape] = None
            traits: Optional[Traits] = None
            if complete:
                shape, size = match_template(ys, xs, config)
                marking, marking_colour = _marking(pixel_classes, ys, xs)
                traits = Traits(size, marking, marking_colour)  # type: ignore[arg-type]
            per_frame[frame].append(Detection(
                frame=frame, colour=colour, area=area, centroid=(float(xs.mean()), float(ys.mean())),
                bbox=(x0, y0, x1, y1), complete=complete, fill=fill, solidity=solidity, shape=shape, traits=traits,
            ))
    return per_frame


def associate(detections: Sequence[Detection], episode: Episode, frame: int) -> dict[int, Detection]:
    """Match one frame's complete detections to the script's on-stage entities of the same kind.

    Within each kind (colour, shape), pairs are taken greedily by increasing distance between the
    detection's centroid and the entity's scripted centre. Entities scripted fully off the canvas
    are not matched.

    Returns:
        ``{entity id: detection}`` for the matched entities.
    """
    trajectory = episode.trajectory
    matches: dict[int, Detection] = {}
    by_kind: dict[tuple[str, str], list[int]] = {}
    for k, entity in enumerate(episode.entities):
        if not trajectory.outside[frame, k]:
            by_kind.setdefault(entity.kind, []).append(k)
    for kind, members in by_kind.items():
        candidates = [d for d in detections if d.complete and d.kind == kind]
        pairs = sorted(
            (math.dist(d.centroid, tuple(trajectory.centres[frame, k])), k, j)
            for k in members for j, d in enumerate(candidates)
        )
        used_entities: set[int] = set()
        used_detections: set[int] = set()
        for _, k, j in pairs:
            if k in used_entities or j in used_detections:
                continue
            matches[k] = candidates[j]
            used_entities.add(k)
            used_detections.add(j)
    return matches


# --------------------------------------------------------------------------------------------------
# Metrics


@dataclass(frozen=True)
class ReturnEvent:
    """Identity measurement around one return.

    Attributes:
        entity: the returning entity.
        leave_frame: first frame of its last ``leave`` segment before the return.
        return_frame: first frame of the ``return`` segment.
        before: majority traits over the last :data:`TRAIT_WINDOW` frames before ``leave_frame`` in
            which the script has the entity fully inside (None without a majority quorum).
        after: majority traits over the first :data:`TRAIT_WINDOW` such frames from ``return_frame``.
        others: majority traits of every other entity of the same kind, measured on the ``before``
            frames.
        recalled: ``before`` and ``after`` were both measured and are equal.
        size_recalled, marking_recalled: the same for the size, and for the marking (kind and colour).
        leaked: ``after`` differs from ``before`` and equals some other same-kind entity's traits;
            None when there is no other same-kind entity with measured traits.
    """

    entity: int
    leave_frame: int
    return_frame: int
    before: Optional[Traits]
    after: Optional[Traits]
    others: tuple[Optional[Traits], ...]
    recalled: bool
    size_recalled: bool
    marking_recalled: bool
    leaked: Optional[bool]

    def to_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "leave_frame": self.leave_frame, "return_frame": self.return_frame,
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "others": [None if o is None else o.to_dict() for o in self.others],
            "recalled": self.recalled, "size_recalled": self.size_recalled,
            "marking_recalled": self.marking_recalled, "leaked": self.leaked,
        }


@dataclass(frozen=True)
class EpisodeReport:
    """Metrics of one episode (definitions in docs/WORLD.md). None = not defined for this episode.

    Attributes:
        frames: frames analysed.
        identity_recall: mean of ``recalled`` over return events. Proxy for identity persistence.
        size_recall, marking_recall: the same per trait.
        leakage: mean of ``leaked`` over return events where it is defined (same-kind companions).
        return_seen: fraction of return events whose *after* traits were measured (the returning entity
            detected with its kind in most of its first frames back). Recall counts an unseen return as
            not recalled, leakage as not leaked: this says how many returns the two actually judged.
        compliance: fraction of judged frames (the segment's actor scripted fully inside) in which
            the actor is detected with its prompted colour and shape and, in ``move`` segments, its
            centroid moved the prompted way since ``max(segment start − 1, t − MOTION_LAG)``.
        compliance_by_action: the same per action.
        presence: fraction of the same judged frames in which the actor is detected with its prompted
            colour and shape (compliance without the motion test).
        judged_frames: frames counted by ``compliance``.
        duplicate_rate: fraction of settled frames (every entity scripted fully inside or fully
            outside) in which some kind has more detections than scripted entities inside.
        vanish_rate: fraction of settled frames in which some kind has fewer.
        settled_frames: frames counted by the two rates.
        flicker_proxy: mean absolute difference (0–255, over channels) between consecutive frames on
            pixels that are background-coloured in both and at least 2 px from any entity pixel.
        events: the return events.
    """

    frames: int
    identity_recall: Optional[float]
    size_recall: Optional[float]
    marking_recall: Optional[float]
    leakage: Optional[float]
    return_seen: Optional[float]
    compliance: Optional[float]
    presence: Optional[float]
    compliance_by_action: dict[str, float]
    judged_frames: int
    duplicate_rate: Optional[float]
    vanish_rate: Optional[float]
    settled_frames: int
    flicker_proxy: Optional[float]
    events: tuple[ReturnEvent, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return {
            "frames": self.frames, "identity_recall": self.identity_recall, "size_recall": self.size_recall,
            "marking_recall": self.marking_recall, "leakage": self.leakage, "return_seen": self.return_seen,
            "compliance": self.compliance, "presence": self.presence,
            "compliance_by_action": dict(self.compliance_by_action), "judged_frames": self.judged_frames,
            "duplicate_rate": self.duplicate_rate, "vanish_rate": self.vanish_rate,
            "settled_frames": self.settled_frames, "flicker_proxy": self.flicker_proxy,
            "events": [event.to_dict() for event in self.events],
        }


METRICS: tuple[str, ...] = ("identity_recall", "size_recall", "marking_recall", "leakage", "return_seen", "compliance",
                            "presence", "duplicate_rate", "vanish_rate", "flicker_proxy")
"""Per-episode scalar metrics that :func:`aggregate` summarises."""


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def _majority(samples: Sequence[Traits]) -> Optional[Traits]:
    """The most common traits if measured on more than half of :data:`TRAIT_WINDOW` frames (ties go to
    the earliest-seen value), else None."""
    if len(samples) <= TRAIT_WINDOW // 2:
        return None
    return Counter(samples).most_common(1)[0][0]


def _measure(matched: Sequence[Mapping[int, Detection]], entity: int, frames: Sequence[int]) -> Optional[Traits]:
    samples = [matched[t][entity].traits for t in frames if entity in matched[t]]
    return _majority([s for s in samples if s is not None])


def _return_events(episode: Episode, matched: Sequence[Mapping[int, Detection]]) -> list[ReturnEvent]:
    trajectory = episode.trajectory
    starts = episode.segment_starts
    events: list[ReturnEvent] = []
    last_leave: dict[int, int] = {}
    for index, segment in enumerate(episode.segments):
        e = segment.entity
        if e is None:
            continue
        if segment.action == "leave":
            last_leave[e] = starts[index]
        if segment.action != "return" or e not in last_leave:
            continue
        leave, back = last_leave[e], starts[index]
        before = [t for t in range(leave) if trajectory.inside[t, e]][-TRAIT_WINDOW:]
        after = [t for t in range(back, episode.total_frames) if trajectory.inside[t, e]][:TRAIT_WINDOW]
        before_traits, after_traits = _measure(matched, e, before), _measure(matched, e, after)
        kind = episode.entities[e].kind
        others = tuple(_measure(matched, k, before) for k, other in enumerate(episode.entities)
                       if k != e and other.kind == kind)
        measured_others = [o for o in others if o is not None]
        both = before_traits is not None and after_traits is not None
        leaked: Optional[bool] = None
        if measured_others:
            leaked = bool(after_traits is not None and after_traits != before_traits and after_traits in measured_others)
        events.append(ReturnEvent(
            entity=e, leave_frame=leave, return_frame=back, before=before_traits, after=after_traits, others=others,
            recalled=both and after_traits == before_traits,
            size_recalled=both and after_traits.size == before_traits.size,  # type: ignore[union-attr]
            marking_recalled=both and (after_traits.marking, after_traits.marking_colour)  # type: ignore[union-attr]
            == (before_traits.marking, before_traits.marking_colour),  # type: ignore[union-attr]
            leaked=leaked,
        ))
    return events


def _compliance(episode: Episode, matched: Sequence[Mapping[int, Detection]], judged_from: int = 0
                ) -> tuple[list[bool], dict[str, list[bool]], list[bool]]:
    """Per judged frame (from ``judged_from`` on): complies (kind and motion); per action; present (kind only)."""
    trajectory = episode.trajectory
    starts = episode.segment_starts
    judged: list[bool] = []
    present: list[bool] = []
    by_action: dict[str, list[bool]] = {}
    for index, segment in enumerate(episode.segments):
        actor = segment.entity
        if actor is None:
            continue
        for t in range(max(starts[index], judged_from), starts[index + 1]):
            if not trajectory.inside[t, actor]:
                continue
            ok = actor in matched[t]
            present.append(ok)
            if ok and segment.action == "move":
                assert segment.direction is not None
                ref = max(starts[index] - 1, t - MOTION_LAG)
                ok = ref >= 0 and actor in matched[ref]
                if ok:
                    ux, uy = direction_vector(segment.direction)
                    (x1, y1), (x0, y0) = matched[t][actor].centroid, matched[ref][actor].centroid
                    along = (x1 - x0) * ux + (y1 - y0) * uy
                    across = abs((x1 - x0) * uy - (y1 - y0) * ux)
                    ok = along >= MIN_MOTION_PIXELS and across <= along
            judged.append(ok)
            by_action.setdefault(segment.action, []).append(ok)
    return judged, by_action, present


def _counts(episode: Episode, detections: Sequence[Sequence[Detection]], judged_from: int = 0
            ) -> tuple[list[bool], list[bool]]:
    trajectory = episode.trajectory
    duplicates: list[bool] = []
    vanished: list[bool] = []
    for t in np.flatnonzero(trajectory.settled[judged_from:]) + judged_from:
        scripted = Counter(e.kind for k, e in enumerate(episode.entities) if trajectory.inside[t, k])
        seen: Counter = Counter(d.kind for d in detections[t])
        duplicates.append(any(seen[kind] > scripted.get(kind, 0) for kind in seen))
        vanished.append(any(seen.get(kind, 0) < count for kind, count in scripted.items()))
    return duplicates, vanished


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """8-neighbour dilation of a ``(T, H, W)`` mask, ``steps`` times, within each frame."""
    out = mask.copy()
    for _ in range(steps):
        out = out | (_neighbours(out) > 0)
    return out


def flicker_proxy(frames: np.ndarray, classes: np.ndarray, background: str) -> Optional[float]:
    """Mean absolute consecutive-frame difference on the stable background (a proxy for flicker).

    Pixels counted for the pair ``(t−1, t)``: classified as ``background`` in both frames and at least
    2 px (8-neighbour) away from any entity- or marking-coloured pixel in either. Returns the mean of
    ``|frame_t − frame_{t−1}|`` over those pixels and the 3 channels (0–255), or None if there are none.
    """
    frames = _check_frames(frames)
    if len(frames) < 2:
        return None
    bg = classes == PALETTE_NAMES.index(background)  # (T, H, W)
    entity_like = np.isin(classes, [*_ENTITY_CLASS.values(), *_MARKING_CLASS.values()])
    near = _dilate(entity_like, 2)
    clean = bg & ~near  # (T, H, W)
    region = clean[1:] & clean[:-1]  # (T-1, H, W)
    if not region.any():
        return None
    diff = np.abs(frames[1:].astype(np.int16) - frames[:-1].astype(np.int16))  # (T-1, H, W, 3)
    return float(diff[region].mean())


def analyse_episode(frames: np.ndarray, episode: Episode, judged_from: int = 0) -> EpisodeReport:
    """Score a video of ``episode`` (rendered ground truth or a model's output).

    Args:
        frames: ``uint8 (T, H, W, 3)`` with ``T == episode.total_frames`` and the episode's canvas size.
        episode: the script the video was made from. Its entities' ``traits`` are NOT used.
        judged_from: the first frame the model made. Frames before it were handed to the model (a
            ground-truth past, ``bench identity --past truth``): compliance, presence, duplicate and
            vanish rates and the flicker proxy count only frames from here on (flicker: pairs whose later
            frame is here or after), while return events still read traits wherever the entity was
            inside (before it left: from the given past).

    Returns:
        The :class:`EpisodeReport`.
    """
    frames = _check_frames(frames)
    config = episode.config
    expected = (episode.total_frames, config.height, config.width, 3)
    if frames.shape != expected:
        raise ValueError(f"frames have shape {frames.shape}, the episode needs {expected}")
    if not 0 <= judged_from < len(frames):
        raise ValueError(f"judged_from must be a frame index in [0, {len(frames)}), got {judged_from}")
    classes = classify_pixels(frames)
    detections = detect_entities(frames, config, classes)
    matched = [associate(detections[t], episode, t) for t in range(len(frames))]

    events = _return_events(episode, matched)
    judged, by_action, present = _compliance(episode, matched, judged_from)
    duplicates, vanished = _counts(episode, detections, judged_from)
    start = max(judged_from - 1, 0)  # flicker: the pair (judged_from − 1, judged_from) is the first judged one
    leaks = [float(e.leaked) for e in events if e.leaked is not None]
    return EpisodeReport(
        frames=len(frames),
        identity_recall=_mean([float(e.recalled) for e in events]),
        size_recall=_mean([float(e.size_recalled) for e in events]),
        marking_recall=_mean([float(e.marking_recalled) for e in events]),
        leakage=_mean(leaks),
        return_seen=_mean([float(e.after is not None) for e in events]),
        compliance=_mean([float(ok) for ok in judged]),
        presence=_mean([float(ok) for ok in present]),
        compliance_by_action={action: float(np.mean(oks)) for action, oks in by_action.items()},
        judged_frames=len(judged),
        duplicate_rate=_mean([float(d) for d in duplicates]),
        vanish_rate=_mean([float(v) for v in vanished]),
        settled_frames=len(duplicates),
        flicker_proxy=flicker_proxy(frames[start:], classes[start:], episode.background),
        events=tuple(events),
    )


# --------------------------------------------------------------------------------------------------
# Aggregation


class BootstrapResult(NamedTuple):
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float


def _as_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite (drop undefined episodes first)")
    return array


def _percentile_interval(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> BootstrapResult:
    """Mean of ``values`` with a percentile bootstrap interval.

    ``n`` resamples of ``len(values)`` items with replacement, drawn from
    ``numpy.random.default_rng(seed)``; the interval is the ``(1−level)/2`` and ``(1+level)/2``
    quantiles of the resampled means.
    """
    if not 0 < level < 1 or n < 1:
        raise ValueError("need 0 < level < 1 and n >= 1")
    array = _as_values(values, "values")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(array), size=(n, len(array)))  # (n, m)
    means = array[index].mean(axis=1)  # (n,)
    return BootstrapResult(float(array.mean()), *_percentile_interval(means, level))


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n: int = 2000, seed: int = 0,
                     level: float = 0.95) -> BootstrapResult:
    """Mean difference ``mean(a − b)`` of paired measurements with a percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` must come from the same episode (e.g. two memory policies on the same
    script and seed); pairs are resampled together, so episode difficulty cancels.
    """
    first, second = _as_values(a, "a"), _as_values(b, "b")
    if len(first) != len(second):
        raise ValueError(f"paired samples need equal lengths, got {len(first)} and {len(second)}")
    return bootstrap_ci(first - second, n=n, seed=seed, level=level)


def aggregate(reports: Sequence[EpisodeReport], n: int = 2000, seed: int = 0, level: float = 0.95
              ) -> dict[str, dict[str, Any]]:
    """Summarise episodes: for each of :data:`METRICS`, the mean over the episodes where it is defined,
    its bootstrap interval, and the number of episodes, as a JSON-able dict
    ``{metric: {"mean", "low", "high", "n"}}`` (mean/low/high None when no episode defines it)."""
    summary: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        values = [getattr(r, metric) for r in reports if getattr(r, metric) is not None]
        if values:
            estimate, low, high = bootstrap_ci(values, n=n, seed=seed, level=level)
            summary[metric] = {"mean": estimate, "low": low, "high": high, "n": len(values)}
        else:
            summary[metric] = {"mean": None, "low": None, "high": None, "n": 0}
    return summary


__all__ = [
    "BootstrapResult",
    "Detection",
    "EpisodeReport",
    "MAX_COLOUR_DISTANCE",
    "METRICS",
    "MIN_DETECTION_PIXELS",
    "HOLE_NEIGHBOURS",
    "MIN_MARKING_PIXELS",
    "MOTION_LAG",
    "PALETTE_NAMES",
    "ReturnEvent",
    "STRIPE_ASPECT",
    "TEMPLATE_SEARCH",
    "TRAIT_WINDOW",
    "aggregate",
    "analyse_episode",
    "associate",
    "bootstrap_ci",
    "classify_pixels",
    "detect_entities",
    "flicker_proxy",
    "match_template",
    "label_components",
    "paired_bootstrap",
]
