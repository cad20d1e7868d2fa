"""The class table: the single source of label maps, class names and palettes.

One row per Cityscapes train class (docs/method.md §2): train id, Cityscapes
labelId (GTA5 labels use the same ids), name, the official Cityscapes colour and
the SYNTHIA-RAND-CITYSCAPES class id. Every lookup array below is derived from
`CLASSES`; nothing else in the package spells out an id mapping.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    train_id: int
    cityscapes_id: int
    name: str
    color: tuple[int, int, int]
    synthia_id: int


# Cityscapes ids and colours as in `cityscapesscripts/helpers/labels.py`; SYNTHIA ids
# from the SYNTHIA-RAND-CITYSCAPES README as listed in docs/method.md §2 (which maps
# terrain 16, truck 18 and train 20 although they never occur in SYNTHIA).
CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo(0, 7, "road", (128, 64, 128), 3),
    ClassInfo(1, 8, "sidewalk", (244, 35, 232), 4),
    ClassInfo(2, 11, "building", (70, 70, 70), 2),
    ClassInfo(3, 12, "wall", (102, 102, 156), 21),
    ClassInfo(4, 13, "fence", (190, 153, 153), 5),
    ClassInfo(5, 17, "pole", (153, 153, 153), 7),
    ClassInfo(6, 19, "traffic light", (250, 170, 30), 15),
    ClassInfo(7, 20, "traffic sign", (220, 220, 0), 9),
    ClassInfo(8, 21, "vegetation", (107, 142, 35), 6),
    ClassInfo(9, 22, "terrain", (152, 251, 152), 16),
    ClassInfo(10, 23, "sky", (70, 130, 180), 1),
    ClassInfo(11, 24, "person", (220, 20, 60), 10),
    ClassInfo(12, 25, "rider", (255, 0, 0), 17),
    ClassInfo(13, 26, "car", (0, 0, 142), 8),
    ClassInfo(14, 27, "truck", (0, 0, 70), 18),
    ClassInfo(15, 28, "bus", (0, 60, 100), 19),
    ClassInfo(16, 31, "train", (0, 80, 100), 20),
    ClassInfo(17, 32, "motorcycle", (0, 0, 230), 12),
    ClassInfo(18, 33, "bicycle", (119, 11, 32), 11),
)

NUM_CLASSES = len(CLASSES)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)

# Ids that exist in each source's label definition (Cityscapes labelIds 0..33,
# SYNTHIA-RAND-CITYSCAPES ids 0..22). Known ids that are not train classes map to
# ignore; ids outside these ranges are "out of map" and are counted when preparing.
CITYSCAPES_NUM_IDS = 34
SYNTHIA_NUM_IDS = 23


def _lookup(pairs: list[tuple[int, int]]) -> np.ndarray:
    table = np.full((256,), IGNORE_LABEL, np.uint8)
    for source_id, train_id in pairs:
        table[source_id] = train_id
    return table


def _known(num_ids: int) -> np.ndarray:
    known = np.zeros((256,), bool)
    known[:num_ids] = True
    return known


CITYSCAPES_ID_TO_TRAIN: np.ndarray = _lookup([(c.cityscapes_id, c.train_id) for c in CLASSES])
SYNTHIA_ID_TO_TRAIN: np.ndarray = _lookup([(c.synthia_id, c.train_id) for c in CLASSES])
IDENTITY_TO_TRAIN: np.ndarray = _lookup([(c.train_id, c.train_id) for c in CLASSES])
CITYSCAPES_KNOWN_IDS: np.ndarray = _known(CITYSCAPES_NUM_IDS)
SYNTHIA_KNOWN_IDS: np.ndarray = _known(SYNTHIA_NUM_IDS)
IDENTITY_KNOWN_IDS: np.ndarray = _known(NUM_CLASSES) | (np.arange(256) == IGNORE_LABEL)

# uint8 (256, 3): colour per train id, ignore (and anything unused) is black.
PALETTE: np.ndarray = np.zeros((256, 3), np.uint8)
PALETTE[: len(CLASSES)] = np.array([c.color for c in CLASSES], np.uint8)

# Train ids evaluated for SYNTHIA -> Cityscapes (docs/method.md §1).
SYNTHIA_16: tuple[int, ...] = tuple(
    c.train_id for c in CLASSES if c.name not in ("terrain", "truck", "train")
)
SYNTHIA_13: tuple[int, ...] = tuple(
    t for t in SYNTHIA_16 if CLASS_NAMES[t] not in ("wall", "fence", "pole")
)


def map_labels(
    ids: np.ndarray, lookup: np.ndarray, known: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Maps source label ids to train ids.

    Args:
      ids: integer (H, W) source ids (uint8, or uint16 for SYNTHIA).
      lookup: uint8 (N,) train id per source id, 255 = ignore.
      known: bool (N,) ids that the source's label definition contains; None = all N.

    Returns:
      uint8 (H, W) train ids, and the number of pixels whose id is outside the map
      (>= N or not known); those pixels become 255.
    """
    ids = np.asarray(ids)
    in_range = ids < lookup.shape[0]
    safe = np.where(in_range, ids, 0).astype(np.intp)
    inside = in_range if known is None else in_range & known[safe]
    mapped = np.where(inside, lookup[safe], IGNORE_LABEL).astype(np.uint8)
    return mapped, int(ids.size - np.count_nonzero(inside))


def colorize(label: np.ndarray) -> np.ndarray:
    """uint8 (H, W) train ids -> uint8 (H, W, 3) Cityscapes colours (ignore is black)."""
    return PALETTE[np.asarray(label, np.uint8)]
