"""Retention (RETENTION_DAYS): uploads and task output files older than the configured age
are deleted from storage, and their rows keep a note of when (`uploads.expired_at`,
`ai_tasks.output_expired_at`). Task rows, their output JSON and the ledger stay as they are.

A plain function of a session factory and a storage, run by beat's
`maintenance.expire_stored_files` (and callable from a shell or a test). Safe to run twice
or concurrently: each batch locks its rows (FOR UPDATE SKIP LOCKED, so two runs never take
the same row), deletes their files while holding the locks, and notes the expiry in the
same transaction. A run interrupted after a delete and before its commit leaves the rows
unmarked; the next run deletes again (a no-op) and marks them.

An upload that a pending or processing task names as input is kept until that task is final
(`models.uploads.check_inputs_owned` makes admission and this job take turns on the upload).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

import metrics
from models.base import utcnow
from models.db import session_scope
from models.tasks import lock_outputs_to_expire, mark_outputs_expired, output_file_key, uploads_in_flight
from models.uploads import lock_uploads_to_expire, mark_uploads_expired

log = logging.getLogger(__name__)

BATCH = 200
# Per run and kind: what is left over waits for the next run (BEAT_RETENTION_SECONDS).
MAX_BATCHES = 50


@dataclass
class RetentionReport:
    outputs: int = 0
    uploads: int = 0
    uploads_in_use: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"outputs": self.outputs, "uploads": self.uploads, "uploads_in_use": self.uploads_in_use}


def _delete(storage, key: str | None) -> None:
    if key is None:
        return  # nothing of ours to delete (an output naming a file outside its own prefix)
    try:
        storage.delete(key)
    except ValueError:
        log.warning("retention: %r is not a storage key; nothing deleted", key)


def expire_outputs(sessions: sessionmaker[Session], storage, completed_before, *, batch: int = BATCH,
                   max_batches: int = MAX_BATCHES) -> int:
    """Delete the output files of tasks completed before `completed_before`; returns how many."""
    done, after = 0, None
    for _ in range(max_batches):
        with session_scope(sessions) as session:
            rows = lock_outputs_to_expire(session, completed_before, after=after, limit=batch)
            if not rows:
                break
            after = (rows[-1].completed_at, rows[-1].id)
            expired, failure = [], None
            for row in rows:
                try:
                    _delete(storage, output_file_key(row.id, row.file))
                except Exception as exc:  # storage unreachable: keep what is done, stop the run
                    failure = exc
                    break
                expired.append(row.id)
            done += mark_outputs_expired(session, expired)
        if failure is not None:
            raise failure
        if len(rows) < batch:
            break
    return done


def expire_uploads(sessions: sessionmaker[Session], storage, created_before, *, batch: int = BATCH,
                   max_batches: int = MAX_BATCHES) -> tuple[int, int]:
    """Delete the files of uploads made before `created_before`, except those a task in flight
    reads; returns (deleted, kept because in use)."""
    done = kept = 0
    after = None
    for _ in range(max_batches):
        with session_scope(sessions) as session:
            rows = lock_uploads_to_expire(session, created_before, after=after, limit=batch)
            if not rows:
                break
            after = (rows[-1].created_at, rows[-1].id)
            # Read after the rows are locked: a task admitted before the lock is seen here, and
            # one admitted after it finds the upload expired.
            in_use = uploads_in_flight(session, sorted({row.user_id for row in rows}))
            expired, failure = [], None
            for row in rows:
                if row.id in in_use:
                    kept += 1
                    continue
                try:
                    _delete(storage, row.storage_key)
                except Exception as exc:
                    failure = exc
                    break
                expired.append(row.id)
            done += mark_uploads_expired(session, expired)
        if failure is not None:
            raise failure
        if len(rows) < batch:
            break
    return done, kept


def expire_stored_files(sessions: sessionmaker[Session], storage, older_than: timedelta, *, batch: int = BATCH,
                        max_batches: int = MAX_BATCHES) -> dict[str, int]:
    """One retention run: outputs of tasks completed, and uploads made, more than
    `older_than` ago."""
    cutoff = utcnow() - older_than
    report = RetentionReport()
    try:
        report.outputs = expire_outputs(sessions, storage, cutoff, batch=batch, max_batches=max_batches)
        report.uploads, report.uploads_in_use = expire_uploads(sessions, storage, cutoff, batch=batch,
                                                               max_batches=max_batches)
    except Exception:
        metrics.JOB_RUNS.labels("retention", "error").inc()
        raise
    metrics.JOB_RUNS.labels("retention", "ok").inc()
    metrics.JOB_ROWS.labels("retention", "done").inc(report.outputs + report.uploads)
    metrics.JOB_ROWS.labels("retention", "skipped").inc(report.uploads_in_use)
    if report.outputs or report.uploads:
        log.info("retention: deleted %d output file(s) and %d upload(s); %d upload(s) kept for tasks in flight",
                 report.outputs, report.uploads, report.uploads_in_use)
    return report.as_dict()
