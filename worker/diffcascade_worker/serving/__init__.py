"""Serving one variant: HTTP routes, batching, deferral to the next stage, limits, metrics."""
