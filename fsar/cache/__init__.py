"""The feature store: cached CLIP frame and class-text embeddings (SPEC 3)."""

from fsar.cache.backends import StoreReadError, StoreWriteError
from fsar.cache.export import export_hdf5
from fsar.cache.fingerprint import SCHEMA_VERSION, canonical_json, recipe_diff, recipe_fingerprint
from fsar.cache.integrity import DamagedStoreError
from fsar.cache.layout import (
    SPLITS,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    BlockData,
    StoreLayout,
    assign_blocks,
    chunk_blocks,
)
from fsar.cache.store import (
    FeatureStore,
    StoreMismatchError,
    StoreSummary,
    create_store,
    format_summary,
    open_store,
)

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "STATUS_DONE",
    "STATUS_FAILED",
    "STATUS_PENDING",
    "BlockData",
    "DamagedStoreError",
    "FeatureStore",
    "StoreLayout",
    "StoreMismatchError",
    "StoreReadError",
    "StoreWriteError",
    "StoreSummary",
    "assign_blocks",
    "canonical_json",
    "chunk_blocks",
    "create_store",
    "export_hdf5",
    "format_summary",
    "open_store",
    "recipe_diff",
    "recipe_fingerprint",
]
