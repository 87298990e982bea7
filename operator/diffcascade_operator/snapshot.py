"""What the controller knows at one instant: the input of `decide()`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from diffcascade_operator.profiles import CascadeProfiles
from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.spec import CascadeSpec

#: Plausibility bounds of what a metrics source reports: an arrival rate above a million images
#: a second, or a queue deeper than ten million, is a broken counter or exporter, not demand.
#: Readings beyond them are refused where they are read (`snapshot_builder.read_metrics`), and
#: `decide()` ignores demand samples beyond them.
MAX_QPS = 1e6
MAX_QUEUE_DEPTH = 1e7


@dataclass(frozen=True)
class DemandSample:
    """The cascade's arrival rate at one control step.

    `qps` counts every arrival since the previous step where the source can (a rate over the
    control interval); `instant_qps` is the rate between the last two scrapes, which shows a
    step one scrape after it happens (None: the source has only the one rate).
    """

    at: float  # seconds (any monotonic clock shared by the snapshot)
    qps: float
    instant_qps: float | None = None
    #: How many seconds `qps` averages over (0: an instant rate); the rate stands for the
    #: middle of that span, so a rising trend is projected from there.
    span_s: float = 0.0


@dataclass(frozen=True)
class StageSample:
    """Live queueing state of one variant (summed over its replicas)."""

    queue_depth: float  # images waiting
    arrival_qps: float  # arrivals at this stage
    inflight: float = 0.0  # requests admitted, not answered (the workers' in-flight gauge)


@dataclass(frozen=True)
class Snapshot:
    spec: CascadeSpec
    profiles: CascadeProfiles
    now: float
    demand: tuple[DemandSample, ...]  # oldest first; may be empty (no metrics yet)
    stages: Mapping[str, StageSample] = field(default_factory=dict)  # by variant name
    ready_replicas: Mapping[str, int] = field(default_factory=dict)  # by variant name
    metrics_available: bool = True
    #: How the cluster spreads a stage's queries over its replicas (the driver knows: a
    #: Kubernetes Service picks at random, `up`'s router the least loaded, the simulator
    #: what its scenario runs); the allocator plans the waiting it causes.
    dispatch: Dispatch = Dispatch.LEAST_LOADED
