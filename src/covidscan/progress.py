"""Progress bars for long steps (rich), silent when asked or when not on a terminal."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from rich.progress import track as rich_track

T = TypeVar("T")


def track(items: Sequence[T], description: str, show: bool = True) -> Iterable[T]:
    return rich_track(items, description=description, total=len(items), disable=not show, transient=True)
