"""The Dagster code location: definitions, partitions, jobs, schedules, sensors and the CLI."""
