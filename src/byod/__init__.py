"""byod: roll versioned schema migrations out to every user-owned database of an app.

The public surface is re-exported here; everything else is an implementation detail.
"""

from byod.errors import ByodError
from byod.registry import Backfill, Migration, MigrationContext, Plan, Registry, Step

__all__ = ["Backfill", "ByodError", "Migration", "MigrationContext", "Plan", "Registry", "Step"]
__version__ = "0.1.0"
