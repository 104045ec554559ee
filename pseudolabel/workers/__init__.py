"""Model workers: the GPU stages, run in their own Python environment and driven through Dagster Pipes.

The orchestrator (Dagster, CPU stages) never imports torch or the model packages. A GPU step starts
``python -m pseudolabel.workers`` in the worker environment (locally, one process per leased GPU; on
Kubernetes, one GPU pod), hands it a :class:`~pseudolabel.workers.task.WorkerTask` through Pipes extras,
and gets back one report per shard. Nothing here imports Dagster; the worker side needs only
``dagster-pipes``.
"""
