"""The deadline rule at dequeue, shared by the worker's batcher and the simulator.

Torch-free, like `protocol` and `deferral`, so the simulator replays exactly the rule the
worker applies instead of an approximation of it.
"""

from __future__ import annotations


def should_drop(*, remaining_s: float, expected_batch_s: float) -> bool:
    """True when a request must be refused at dequeue instead of run.

    `remaining_s` is what is left of its budget (the SLO, or the budget a deferring stage
    forwarded); `expected_batch_s` is how long the batch it would join takes. It is dropped
    when the batch would end after its deadline: finishing late helps nobody and delays
    everything queued behind it. Exactly on the deadline still runs. With nothing known about
    batch latency (0 s expected) only requests already past their deadline are dropped.
    """
    return remaining_s < expected_batch_s


__all__ = ["should_drop"]
