"""Reference data from the DiffServe artifact (see ATTRIBUTION.md), read via importlib.resources."""
