"""Datasets, shard formats and data transforms."""
