"""Dagster-free domain code for the pseudo-labelling pipeline.

Everything under this package can be imported and unit-tested without Dagster; the
Dagster assets in ``assets/`` only wire these functions to storage and metadata.
"""
