"""The training driver (``driver``), the per-worker recipe Ray Train runs (``recipe``), the
distributed helpers it uses (``distributed``), what the driver hands each worker (``worker_spec``)
and the checkpoint format (``checkpoints``)."""
