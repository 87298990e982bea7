"""Trace-driven simulator: the real control loop against simulated light and heavy workers.

`engine` replays a trace in virtual time through worker pools that follow the real worker's
queueing, batching, gate and drop rules; `policies` adapts `decide()` and the baselines;
`metrics` and `report` turn the outcome into the figures the paper reports.
"""
