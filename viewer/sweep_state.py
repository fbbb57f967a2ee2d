"""The comparison viewer's state, free of Qt: `ViewerState` (epoch, group, log axis, threshold) plus which runs are
shown and the reference run that divergences are measured from.

Like `ViewerState`, listeners run only on a real change, and the docks change it only through its setters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from viewer.state import Event, ViewerState


class SweepState(ViewerState):
    """`ViewerState` over a sweep's shared epoch axis, with the shown runs (`selected`, in the sweep's order) and
    the `reference` run (any run, shown or not)."""

    def __init__(self, n_epochs: int, groups: Sequence[str], runs: Sequence[str], *, index: int = 0,
                 group: str = "all") -> None:
        super().__init__(n_epochs, groups, index=index, group=group)
        self.runs = tuple(runs)
        if not self.runs:
            raise ValueError("a sweep state needs at least one run")
        self.selected = self.runs
        self.reference = self.runs[0]
        self.selection_changed = Event()
        self.reference_changed = Event()

    def set_selected(self, runs: Iterable[str]) -> None:
        """Show exactly `runs` (names of the sweep's runs; none is allowed: every overlay empties)."""
        chosen = set(runs)
        unknown = chosen - set(self.runs)
        if unknown:
            raise ValueError(f"unknown run {sorted(unknown)[0]!r}; choose from {', '.join(self.runs)}")
        selected = tuple(r for r in self.runs if r in chosen)
        if selected != self.selected:
            self.selected = selected
            self.selection_changed.emit(selected)

    def set_shown(self, run: str, shown: bool) -> None:
        """Show or hide one run."""
        self.set_selected({*self.selected, run} if shown else set(self.selected) - {run})

    def set_reference(self, run: str) -> None:
        """Measure divergences from `run`."""
        if run not in self.runs:
            raise ValueError(f"unknown run {run!r}; choose from {', '.join(self.runs)}")
        if run != self.reference:
            self.reference = run
            self.reference_changed.emit(run)
