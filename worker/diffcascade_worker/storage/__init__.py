"""Storage URIs of models, gates and curves, and fetching them into a model cache."""
