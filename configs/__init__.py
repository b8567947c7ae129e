"""ml_collections configs for denseflow-jax; every module exposes `get_config()`."""
