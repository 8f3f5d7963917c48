"""Fetching http(s) inputs (the SSRF-guarded fetcher comes with the processing issue)."""

from __future__ import annotations

from pathlib import Path

from .processors.base import PermanentError


def fetch_to_file(url: str, target: Path, settings) -> str:
    raise PermanentError("Fetching URLs is not available yet", code="fetch_unavailable")
