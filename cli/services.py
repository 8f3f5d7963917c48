"""Where the CLI finds its servers: the environment (and `.env`), as every process does;
failing that, the embedded ones a running `make run` wrote to `var/services.env`."""

from __future__ import annotations

import os
from pathlib import Path

from dotenv import dotenv_values

from settings import Settings


def settings(*, broker: bool) -> Settings:
    env = dict(os.environ)
    dotenv = {k: v for k, v in dotenv_values(env.get("STUDIOX_DOTENV", ".env")).items() if v is not None}
    env = {**dotenv, **env}  # real environment variables win over `.env`
    if not env.get("DATABASE_URL"):
        var_dir = Path(env.get("STUDIOX_VAR_DIR") or "var")
        services = var_dir / "services.env"
        if services.exists():
            found = {k: v for k, v in dotenv_values(services).items() if v is not None}
            env = {**found, **{k: v for k, v in env.items() if v}}
    return Settings.from_env(env, broker=broker)
