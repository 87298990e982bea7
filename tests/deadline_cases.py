"""The drop rule's boundary cases, shared by the worker's and the simulator's tests.

Both apply `diffcascade_worker.deadline.should_drop`; each test suite drives its own code
(the batcher, the simulated worker) through these cases, so a drift between the two shows as
a failing case on one side. (remaining budget s, expected batch s, dropped)
"""

from __future__ import annotations

#: Cases both sides can reproduce (a simulated batch always takes time).
SHARED: tuple[tuple[float, float, bool], ...] = (
    (1.0, 1.0, False),  # exactly on the deadline still runs
    (0.75, 1.0, True),  # would end a quarter second late
    (4.0, 0.25, False),  # plenty of time
    (0.0, 0.5, True),  # no budget left
)
#: Cases only the worker meets: nothing measured yet (0 s expected).
WORKER_ONLY: tuple[tuple[float, float, bool], ...] = (
    (0.5, 0.0, False),  # never drop on a guess
    (-0.25, 0.0, True),  # already past its deadline
)
