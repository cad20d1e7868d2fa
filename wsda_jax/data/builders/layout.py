"""Finding a raw dataset's files, and saying clearly when they are not where expected."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence


class LayoutError(FileNotFoundError):
    """The raw dataset folder is missing or does not have the expected layout."""


def describe_found(root: str, limit: int = 12) -> str:
    """A short listing of what is under `root` (two levels), for layout errors."""
    if not os.path.isdir(root):
        return f"{root} does not exist"
    found = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if os.path.isdir(path):
            children = sorted(os.listdir(path))
            shown = ", ".join(children[:4]) + (", ..." if len(children) > 4 else "")
            found.append(f"{entry}/ ({len(children)} entries: {shown})")
        else:
            found.append(entry)
    if not found:
        return f"{root} is empty"
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return f"{root} contains: " + "; ".join(found[:limit]) + more


def layout_error(manual_dir: str, expected: Sequence[str], problem: str) -> LayoutError:
    patterns = "\n".join(f"  {os.path.join(manual_dir, p)}" for p in expected)
    return LayoutError(
        f"{problem}\nExpected files matching:\n{patterns}\nFound: {describe_found(manual_dir)}"
    )


def glob_files(manual_dir: str, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(manual_dir, pattern), recursive=True))


def pair_by_key(
    manual_dir: str,
    expected: Sequence[str],
    images: dict[str, str],
    labels: dict[str, str],
    what: str,
) -> list[tuple[str, str, str]]:
    """Sorted (key, image path, label path); every image needs a label and vice versa."""
    if not images or not labels:
        raise layout_error(
            manual_dir, expected, f"{what}: found {len(images)} images and {len(labels)} labels"
        )
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        shown = ", ".join(unmatched[:5])
        raise layout_error(
            manual_dir,
            expected,
            f"{what}: {len(unmatched)} images or labels without a partner, e.g. {shown}",
        )
    return [(key, images[key], labels[key]) for key in sorted(images)]
