"""Data curation: filters that turn a pool of shards into a subset file (docs/curation.md)."""
