"""The label half of the pipeline: stored candidates + masks -> thresholds -> kept instances -> COCO.

Dagster-free; ``assets/pseudo_labels.py`` wires it to storage.
"""
