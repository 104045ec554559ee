"""Dagster resources: thin configurable wrappers around the domain code in ``pseudolabel``."""
