"""The teacher job: run a teacher once over the QA shards and store only the attention the losses use.

Notebook use: ``from pipeline.cache.reader import open_cache``.
"""
