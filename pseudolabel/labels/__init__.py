"""The label half of the pipeline: stored candidates + masks -> thresholds -> kept instances -> COCO.

Modules, leaf first: :mod:`thresholds` (the versioned YAML), :mod:`picking` (filters, NMS, pick
policies), :mod:`relabel` (one shard's label decision) and :mod:`coco` (the export and its checks).
Dagster-free; ``assets/pseudo_labels.py`` wires it to storage.
"""
