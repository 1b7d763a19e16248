"""``python -m byod.api.document``: print the HTTP API's OpenAPI document (what
``byod serve`` answers at ``/openapi.json``), for client generators; byod's TypeScript
client is made from it (``make client``)."""

from __future__ import annotations

import json
import sys

from byod.api.app import openapi_document

__all__ = ["document_text"]


def document_text() -> str:
    """The document as JSON text, two-space indented, ending in a newline: stable from
    one byod to the same byod, so a committed copy shows every change in a diff."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(document_text())
