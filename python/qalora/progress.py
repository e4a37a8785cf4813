"""Progress bars for long work (tqdm), quiet for short loops and when asked."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, enabled: bool | None = None, min_items: int = 1, total: int | None = None
) -> Iterable[T]:
    """Wraps ``items`` in a tqdm bar when ``enabled`` (default: when there are at least
    ``min_items`` items and QALORA_NO_PROGRESS is unset)."""
    from tqdm.auto import tqdm

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if enabled is None:
        enabled = (total is None or total >= min_items) and not os.environ.get("QALORA_NO_PROGRESS")
    return tqdm(items, desc=desc, total=total, disable=not enabled, dynamic_ncols=True)
