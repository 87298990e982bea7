"""The diffusers side: loading, running, profiling and building (tiny) pipelines."""
