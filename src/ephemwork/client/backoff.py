"""Capped exponential backoff with jitter, for reconnecting and for restarting dev servers."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from *base* up to *cap* seconds, each scaled by a random factor.

    The factor lies in ``[1 - jitter, 1]``, so several laptops that lost the same bastion at
    the same moment do not all retry in step, and no delay exceeds *cap*.
    """

    base: float
    cap: float
    jitter: float
    attempts: int
    _random: random.Random

    def __init__(
        self,
        base: float,
        cap: float,
        *,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"Backoff needs 0 < base <= cap, got base={base!r}, cap={cap!r}.")
        if not 0 <= jitter < 1:
            raise ValueError(f"Backoff jitter must be in [0, 1), got {jitter!r}.")
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.attempts = 0
        self._random = rng if rng is not None else random.Random()

    def next_delay(self) -> float:
        """Return the seconds to wait before the next attempt, and count the attempt."""
        ceiling = min(self.cap, self.base * 2**self.attempts)
        self.attempts += 1
        return float(ceiling * (1 - self.jitter * self._random.random()))

    def reset(self) -> None:
        """Start again from *base*, after an attempt succeeded."""
        self.attempts = 0
