"""The HTTP service (FastAPI): status for users, the fleet view and runs for operators.

The core never imports this package.
"""

from byod.api.app import create_app, openapi_document
from byod.api.auth import AuthSettings
from byod.api.guard import HttpSettings

__all__ = ["AuthSettings", "HttpSettings", "create_app", "openapi_document"]
