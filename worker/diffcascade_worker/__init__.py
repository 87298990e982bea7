"""diffcascade data plane: a diffusers worker with dynamic batching and a difficulty gate."""

__version__ = "0.1.0"
