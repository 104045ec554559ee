"""Shards are dynamic partitions shared by every partitioned asset of the chain."""

from dagster import DynamicPartitionsDefinition

SHARDS_PARTITIONS_NAME = "shards"

shard_partitions = DynamicPartitionsDefinition(name=SHARDS_PARTITIONS_NAME)
