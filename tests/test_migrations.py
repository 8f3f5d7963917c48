"""The schema is made by Alembic alone: it upgrades, downgrades and re-upgrades on a fresh
database, seeds the plans, and matches the models exactly."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from devenv.embedded import migrate
from models import Base

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def relations(engine) -> set[str]:
    """Everything left in the public schema: tables, indexes, sequences, views, enums, domains."""
    with engine.connect() as conn:
        found = conn.execute(text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public'"
            " UNION ALL SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
            " WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd')"
        )).scalars().all()
    return set(found) - {"alembic_version", "pk_alembic_version", "alembic_version_pkc"}


def tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("postgresql+psycopg://unused/x")).get_current_head()


def current_revision(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def snapshot(engine) -> dict:
    engine.dispose()  # a fresh connection sees the schema as it is now
    snap = {"revision": current_revision(engine), "tables": tables(engine), "relations": relations(engine)}
    if "plans" in snap["tables"]:
        with engine.connect() as conn:
            snap["plans"] = conn.execute(text(
                "SELECT id, monthly_credits, max_concurrent_tasks FROM plans ORDER BY sort_order")).all()
    return snap


@pytest.fixture(scope="module")
def walk(databases):
    """On a database of its own: upgrade head, downgrade base, upgrade head; a snapshot after each."""
    name = f"studiox_migrations_{uuid.uuid4().hex[:8]}"
    admin = create_engine(databases["admin"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(databases["admin"]).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        steps = {"empty": snapshot(engine)}
        migrate(url)
        steps["upgraded"] = snapshot(engine)
        command.downgrade(alembic_config(url), "base")
        steps["downgraded"] = snapshot(engine)
        migrate(url)
        steps["upgraded_again"] = snapshot(engine)
        yield engine, steps
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class TestMigrationWalk:
    def test_database_starts_empty(self, walk):
        _, steps = walk
        assert steps["empty"]["revision"] is None and steps["empty"]["relations"] == set()

    def test_upgrade_head_creates_every_model_table(self, walk):
        _, steps = walk
        assert steps["upgraded"]["revision"] == head_revision()
        assert steps["upgraded"]["tables"] == set(Base.metadata.tables)

    def test_downgrade_base_removes_everything(self, walk):
        _, steps = walk
        assert steps["downgraded"]["revision"] is None
        assert steps["downgraded"]["relations"] == set()  # no table, index, sequence or type left behind

    def test_upgrade_head_again_rebuilds_the_same_schema(self, walk):
        _, steps = walk
        assert steps["upgraded_again"]["revision"] == head_revision()
        assert steps["upgraded_again"]["relations"] == steps["upgraded"]["relations"]


class TestSeededPlans:
    def test_plans_are_seeded_by_the_migration(self, walk):
        _, steps = walk
        for step in ("upgraded", "upgraded_again"):
            plans = steps[step]["plans"]
            assert [p.id for p in plans] == ["free", "pro", "enterprise"]
            assert all(p.monthly_credits > 0 and p.max_concurrent_tasks > 0 for p in plans)


class TestModelsMatchMigrations:
    def test_autogenerate_finds_no_difference(self, walk):
        engine, _ = walk
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            diff = compare_metadata(context, Base.metadata)
        assert diff == [], "\n".join(map(str, diff))
