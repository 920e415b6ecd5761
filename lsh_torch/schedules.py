"""When to rebuild the hash tables, counted in training steps (forward passes in training mode)."""
from __future__ import annotations

import bisect
import numbers

from ._checks import check_int


class RebuildSchedule:
    """Base class: ``schedule(step)`` is True when the tables are rebuilt before training step ``step``.

    Step 0 never needs one: the tables are built from the initial weights when first used.
    Schedules are stateless (a function of the step alone), so a resumed run rebuilds at the
    same steps as one that never stopped.
    """

    def __call__(self, step: int) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(self, step) -> bool: whether the "
                                  "tables are rebuilt before that training step")


class ConstantSchedule(RebuildSchedule):
    """Rebuild every ``period`` steps."""

    def __init__(self, period: int):
        self.period = check_int("period", period, 1, 2 ** 62)

    def __call__(self, step: int) -> bool:
        return step > 0 and step % self.period == 0

    def __repr__(self):
        return f"ConstantSchedule(period={self.period})"


class GrowingSchedule(RebuildSchedule):
    """Frequent rebuilds early, rarer as training settles (SLIDE's exponentially decaying rate).

    The i-th gap between rebuilds is ``initial * growth**i`` steps (rounded), capped at
    ``max_period``: with the defaults, rebuilds at steps 50, 105, 166, 233, ... then every 1000.
    """

    def __init__(self, initial: int = 50, growth: float = 1.1, max_period: int = 1000):
        initial = check_int("initial", initial, 1, 2 ** 62)
        if isinstance(growth, bool) or not isinstance(growth, numbers.Real):
            raise TypeError(f"growth must be a float, got {type(growth).__name__}")
        if not 1.0 <= growth < float("inf"):
            raise ValueError(f"growth must be a finite float >= 1, got {growth!r}")
        max_period = check_int("max_period", max_period, initial, 2 ** 62)
        self.initial, self.growth, self.max_period = initial, float(growth), max_period

    def __call__(self, step: int) -> bool:
        if step <= 0:
            return False
        if self.growth == 1.0:  # a constant gap: no walk over the gaps (it would cost O(step) a call)
            return step % min(self.initial, self.max_period) == 0
        steps, capped_at = self._walk_to(step)
        if capped_at is not None and step > capped_at:
            return (step - capped_at) % self.max_period == 0
        i = bisect.bisect_left(steps, step)
        return i < len(steps) and steps[i] == step

    def _walk_to(self, step: int) -> tuple[list[int], int | None]:
        """The rebuild steps before the gaps reach ``max_period`` (walked up to ``step``, kept for the next
        call: walking from 0 at every call cost 24 ms a step at step 10^6 with a growth of 1.0001), and
        the step from which the gap is ``max_period`` (None if not reached yet)."""
        key = (self.initial, self.growth, self.max_period)  # settings changed after a call: walk again
        walk = self.__dict__.get("_walk")
        if walk is None or walk["key"] != key:
            walk = self._walk = {"key": key, "steps": [], "at": 0, "gap": float(self.initial), "capped_at": None}
        while walk["capped_at"] is None and walk["at"] < step:
            period = min(self.max_period, max(1, round(min(walk["gap"], self.max_period))))  # (gap * growth: inf)
            if period == self.max_period:
                walk["capped_at"] = walk["at"]
                break
            walk["at"] += period
            walk["steps"].append(walk["at"])
            walk["gap"] *= self.growth
        return walk["steps"], walk["capped_at"]

    def __getstate__(self):
        # The walk is a cache (2.4 million steps, 12 MB, at step 10^7 with a growth of 1.000001): not pickled.
        return {key: value for key, value in self.__dict__.items() if key != "_walk"}

    def __repr__(self):
        return f"GrowingSchedule(initial={self.initial}, growth={self.growth}, max_period={self.max_period})"


def as_schedule(rebuild) -> RebuildSchedule | None:
    """Accepts a schedule, a callable ``step -> bool``, an int period, or None (manual rebuilds only)."""
    if rebuild is None or isinstance(rebuild, RebuildSchedule):
        return rebuild
    if isinstance(rebuild, bool):
        raise TypeError("rebuild must be a schedule, a callable, an int period or None, got a bool")
    if isinstance(rebuild, numbers.Integral):  # numpy ints too
        check_int("rebuild (a period in steps)", rebuild, 1, 2 ** 62)
        return ConstantSchedule(rebuild)
    if callable(rebuild):
        return rebuild
    raise TypeError(f"rebuild must be a schedule, a callable, an int period or None, got {type(rebuild).__name__}")
