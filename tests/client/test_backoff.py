"""Tests of the capped exponential backoff."""

from __future__ import annotations

import random

from ephemwork.client.backoff import Backoff


class TestBackoff:
    def test_doubles_up_to_cap(self) -> None:
        """Without jitter the delays double from base and stop at cap."""
        backoff = Backoff(0.25, 3.0, jitter=0.0)

        delays = [backoff.next_delay() for _ in range(6)]

        assert delays == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]

    def test_jitter_stays_below_ceiling(self) -> None:
        """With jitter every delay lies between half the ceiling and the ceiling."""
        backoff = Backoff(1.0, 4.0, jitter=0.5, rng=random.Random(7))

        delays = [backoff.next_delay() for _ in range(20)]

        assert all(0.5 <= delay <= 1.0 for delay in delays[:1])
        assert all(2.0 <= delay <= 4.0 for delay in delays[3:])

    def test_reset_starts_over(self) -> None:
        """After reset the next delay is base again."""
        backoff = Backoff(0.5, 30.0, jitter=0.0)
        backoff.next_delay()
        backoff.next_delay()

        backoff.reset()

        assert backoff.next_delay() == 0.5
