"""diffcascade control plane: allocator, simulator, Kopf operator and the one-machine mode."""

__version__ = "0.1.0"
