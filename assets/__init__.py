"""Dagster assets: each reads its inputs, calls domain code in ``pseudolabel``, writes outputs and metadata."""
