"""Turn a task's input sources (upload ids, URLs) into local files for its processor.

Uploads come from storage: the local directory's own file, or an object downloaded into
the task's scratch directory (`workdir`, which the caller removes when the task ends).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from models.errors import UploadNotFound
from models.uploads import UploadExpired, upload_file
from tasktypes.inputs import input_sources, source_ref

from .processors.base import InputFile, PermanentError, TransientError

log = logging.getLogger(__name__)


def resolve_inputs(
    session: Session, user_id: uuid.UUID, task_type: str, input: Any, *, storage, settings, workdir: Path
) -> list[InputFile]:
    """Upload ids must belong to the task's owner; URLs are fetched with the SSRF guard."""
    files: list[InputFile] = []
    try:
        sources = [source_ref(source) for source in input_sources(task_type, input)]
    except ValueError as exc:  # admitted under older rules
        raise PermanentError(str(exc), code="invalid_input") from None
    for index, (kind, ref) in enumerate(sources):
        if kind == "upload":
            try:
                key, content_type = upload_file(session, user_id, uuid.UUID(ref))
            except UploadExpired as exc:
                raise PermanentError(exc.message, code="input_expired") from None
            except (ValueError, UploadNotFound):
                raise PermanentError(f"Upload {ref} not found", code="input_not_found") from None
            try:
                path = storage.local_file(key, workdir / f"input-{index}")
            except FileNotFoundError:
                raise PermanentError(f"Upload {ref} has no stored file", code="input_not_found") from None
            except Exception as exc:  # the store is unreachable or refused: worth a retry
                log.warning("reading upload %s from storage failed: %s: %s", ref, type(exc).__name__, exc)
                raise TransientError(f"Upload {ref} could not be read from storage",
                                     code="storage_unavailable") from None
            files.append(InputFile(path, content_type, ref))
        else:
            from .fetch import fetch_to_file

            workdir.mkdir(parents=True, exist_ok=True)
            target = workdir / f"input-{index}"
            content_type = fetch_to_file(ref, target, settings)
            files.append(InputFile(target, content_type, ref))
    return files
