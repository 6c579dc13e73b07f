"""The worker loop's data-wait figure: time blocked on the batch iterator, not the consumer's."""

from __future__ import annotations

import time
from collections.abc import Iterator

from pipeline.train.worker import _Clock, _timing_waits


def _slow_batches(count: int, seconds: float) -> Iterator[int]:
    for i in range(count):
        time.sleep(seconds)  # the producer: a reader that keeps the worker waiting
        yield i


def test_waits_for_each_batch_are_added_to_the_window_and_the_consumers_time_is_not() -> None:
    clock = _Clock()
    consumer = 0.0
    seen = []
    for batch in _timing_waits(_slow_batches(4, 0.05), clock):
        seen.append(batch)
        began = time.monotonic()
        time.sleep(0.5)  # the step: not waiting
        consumer += time.monotonic() - began
    assert seen == [0, 1, 2, 3]
    assert clock.window_wait >= 4 * 0.05
    # Had the consumer's 4 x 0.5 s counted, the wait would exceed the consumer's own time.
    assert clock.window_wait < consumer


def test_a_consumer_that_stops_early_leaves_only_the_waits_it_asked_for() -> None:
    clock = _Clock()
    for batch in _timing_waits(_slow_batches(10, 0.02), clock):
        if batch == 1:
            break
    assert clock.window_wait >= 2 * 0.02
