"""Versioned on-disk contracts and their validation. Imports nothing else of this project.

- schemas.qa: the QA record (parse the authors' QA JSON, normalise, versioned JSON form).
- schemas.shards: the manifest of a QA shard set written by `python -m pipeline.ingest`.
"""
