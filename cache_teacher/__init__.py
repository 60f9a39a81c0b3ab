"""The teacher job: run a teacher once over the QA shards and store only the attention the losses use.

Notebook use: ``from cache_teacher import open_cache``.
"""

from pipeline.cache_reader import open_cache

__all__ = ["open_cache"]
