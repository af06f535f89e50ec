"""`--max-minutes`: a training run's time budget, shared by the supervised and the self-supervised loops.

The cosine schedule must end when the time does, or the run stops at its peak learning rate. So the step count is
fitted to the time left from the measured rate: a first guess a few steps after the first one (which compiles and
autotunes, so it is never timed), then again from the steps since (the first steps after compiling run slower than
the rest). Time the loop spends on anything but training (evaluations) is paused out of the budget: otherwise a
per-epoch evaluation, which compiles its own kernels on a cold cache, would count as training time in the rate and
shrink the plan to a few steps.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


class TimeBudget:
    """minutes None: no budget (never out of time, never fitted). `fit_at`: steps after the run's first step at
    which the schedule is fitted; `share`: the part of the budget the plan aims at (the rest absorbs the rate's
    error and the final save); `planned`: a resumed run keeps the plan it saved (only the time limit applies)."""

    def __init__(self, minutes: float | None, first_step: int, fit_at: tuple[int, ...] = (20, 100),
                 share: float = 0.95, planned: bool = False, clock: Callable[[], float] = time.monotonic):
        self.seconds = None if minutes is None else 60.0 * minutes
        self.clock, self.share = clock, share
        self.start, self.paused = clock(), 0.0
        self.fit_steps = tuple(first_step + k for k in fit_at)
        self.fitted = minutes is None or planned
        self._from: tuple[int, float] | None = None  # (step, elapsed) the rate is measured from
        self.rate: float | None = None  # steps/s at the last fit

    def elapsed(self) -> float:
        """Seconds of this run's training so far (paused time excluded)."""
        return self.clock() - self.start - self.paused

    def out_of_time(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Time inside does not count (an evaluation between epochs)."""
        t = self.clock()
        try:
            yield
        finally:
            self.paused += self.clock() - t

    def first_step_done(self, step: int) -> None:
        """Call after the run's first step has finished on the device: the rate is measured from here."""
        self._from = (step, self.elapsed())

    def due(self, step: int) -> bool:
        """Whether `fit` wants this step (the caller synchronises the device first, so the clock sees the work)."""
        return not self.fitted and self._from is not None and step in self.fit_steps

    def fit(self, step: int, total_steps: int, cap: int) -> int:
        """The step count (at most cap, more than step) that ends at `share` of the budget at the rate since the
        last fit; after the last fit step, or when the plan ends before it, no more fits."""
        now = self.elapsed()
        rate = (step - self._from[0]) / max(now - self._from[1], 1e-9)
        total = min(cap, max(step + 1, int(step + rate * (self.share * self.seconds - now))))
        self._from = (step, now)
        self.fitted = step >= self.fit_steps[-1] or total <= self.fit_steps[-1]
        self.rate = rate
        return total


def warmup_steps(warmup: int, total_steps: int, budgeted: bool) -> int:
    """The learning-rate warm-up of a run: a plan fitted to a time budget keeps at least three quarters of its steps
    after the warm-up (a short budget would otherwise end inside it, at the peak rate); a run of fixed length keeps
    the warm-up it asked for. A function of the plan alone, so a resumed run has the same schedule."""
    return min(warmup, total_steps // 4) if budgeted else warmup
