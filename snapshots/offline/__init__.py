"""The offline vector index: exact search over the last snapshot while Qdrant is down (DESIGN.md).

layout.py writes and checks the on-disk layout, search.py reads it with Qdrant's semantics,
filters.py evaluates Qdrant filters, serve.py answers the read-only part of Qdrant's REST API.
"""
from snapshots.offline.layout import write_offline_collection
from snapshots.offline.search import OfflineCollection, OfflineIndex

__all__ = ["OfflineCollection", "OfflineIndex", "write_offline_collection"]
