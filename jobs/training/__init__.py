"""The training driver (``driver``: ``train``, put together from ``run_start``, ``dataset``,
``run_folder``, ``ray_setup``, ``mlflow_run``, ``trainer``, ``epoch_report``, ``outcome`` and
``final_artifacts``), the per-worker recipe Ray Train runs (``recipe``), the distributed helpers it
uses (``distributed``), what the driver hands each worker (``worker_spec``) and the checkpoint
format (``checkpoints``)."""
