"""Progress bars (rich) that can be switched off for tests and non-interactive runs.

:func:`track` wraps one iterable; :class:`CohortProgress` shows two bars while
features are extracted: the whole cohort (patches/s and ETA over all of this rank's
slides) and the slide being read.
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar on stderr when ``enabled``."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, console=Console(stderr=True), transient=True)


class CohortProgress:
    """An overall bar (patches of all slides, patches/s, ETA) above a per-slide bar.

    Use as a context manager; a disabled one does nothing, so callers never branch.
    """

    def __init__(self, total_patches: int, n_slides: int, enabled: bool = True):
        self.enabled = enabled and total_patches > 0
        self.total, self.n_slides, self.done_slides = int(total_patches), int(n_slides), 0
        self._progress = None
        self._overall = self._slide = None

    def __enter__(self) -> "CohortProgress":
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task) -> Text:  # noqa: D102
                return Text("   …  patches/s" if task.speed is None else f"{task.speed:7.1f} patches/s")

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=Console(stderr=True), transient=True)
        self._progress.__enter__()
        self._overall = self._progress.add_task(self._overall_text(), total=self.total)
        return self

    def _overall_text(self) -> str:
        return f"all slides {self.done_slides}/{self.n_slides}"

    def start_slide(self, name: str, n_patches: int) -> None:
        """Show a fresh bar for slide ``name`` with ``n_patches`` patches."""
        if self._progress is None:
            return
        if self._slide is not None:
            self._progress.remove_task(self._slide)
        self._slide = self._progress.add_task(name, total=max(1, n_patches))

    def advance(self, n: int) -> None:
        """``n`` more patches encoded (both bars)."""
        if self._progress is None:
            return
        self._progress.advance(self._overall, n)
        if self._slide is not None:
            self._progress.advance(self._slide, n)

    def end_slide(self, n_left: int = 0) -> None:
        """The slide is finished (or failed with ``n_left`` patches not encoded: they leave the total)."""
        if self._progress is None:
            return
        self.done_slides += 1
        if n_left:
            self.total -= n_left
            self._progress.update(self._overall, total=max(1, self.total))
        self._progress.update(self._overall, description=self._overall_text())

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
