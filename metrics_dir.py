"""The metrics directory of prometheus_client's multiprocess mode, set up before that
library is imported (it reads the variable once, at import): see `metrics.py`."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess_dir(name: str) -> str:
    """Give this process tree a fresh metrics directory, unless one is configured."""
    path = os.environ.get(ENV)
    if path:
        return path  # the operator's: shared by whatever they point at it, never emptied here
    base = os.environ.get("STUDIOX_VAR_DIR")
    path = (str(Path(base) / "metrics" / f"{name}-{os.getpid()}") if base
            else tempfile.mkdtemp(prefix=f"studiox-metrics-{name}-"))
    shutil.rmtree(path, ignore_errors=True)  # a pid reused from an earlier run
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    owner = os.getpid()
    # Removed when the process that made it exits (not its forked children, which inherit
    # this hook: gunicorn's workers and Celery's pool end while their parent still runs).
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # Imported already (Celery's command line loads Flower's plugin, which imports it):
        # the library chose its value class at import, so choose again; metrics made from
        # now on (ours, in metrics.py) write to the directory.
        values.ValueClass = values.get_value_class()
    return path
