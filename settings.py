"""One settings object, read from the environment once and passed down.

`Settings.from_env()` is called at each process's edge (gunicorn app factory, Celery
app, `make run`); everything else receives the object. Outside development it refuses
insecure defaults and names the variable that is missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from logconfig import default_format
from tasktypes import TASK_TYPE_SPECS

DEV_JWT_SECRET = "studiox-dev-secret-not-for-production-use"
# Requests per minute a user may make, by plan (RATE_LIMIT_<PLAN>).
RATE_LIMIT_DEFAULTS = {"free": 60, "pro": 300, "enterprise": 1200}
# The plans sold through Stripe; each has its price id in STRIPE_PRICE_<PLAN>.
PAID_PLANS = ("pro", "enterprise")
ENVIRONMENTS = ("development", "test", "production")


class ConfigError(RuntimeError):
    """The environment does not describe a runnable service."""


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _positive(env: dict[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _positive_float(env: dict[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


# Seconds before each retry of a webhook delivery (the first attempt is at once): about a
# day in all, then the delivery has failed (WEBHOOK_RETRY_SECONDS, a comma list).
WEBHOOK_RETRY_DEFAULT = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 28800.0)


def _seconds_list(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        values = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a comma list of seconds, got {raw!r}") from None
    if any(value < 0 for value in values):
        raise ConfigError(f"{name} must not hold a negative number of seconds, got {raw!r}")
    return values


def _proxies(env: Mapping[str, str]) -> tuple[str, ...]:
    import ipaddress

    proxies = _split(env.get("TRUSTED_PROXIES"))
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"TRUSTED_PROXIES: {proxy!r} is not an IP address or network") from None
    return proxies


@dataclass(frozen=True)
class TimeLimit:
    """Seconds: the soft limit fails the task and refunds it; the hard one kills the child."""

    soft: float
    hard: float


def default_time_limits() -> Mapping[str, TimeLimit]:
    return MappingProxyType({name: TimeLimit(spec.soft_time_limit, spec.hard_time_limit)
                             for name, spec in TASK_TYPE_SPECS.items()})


def time_limits_from_env(env: Mapping[str, str]) -> Mapping[str, TimeLimit]:
    """Each type's limits; `TIME_LIMIT_<TYPE>=soft,hard` overrides one (every process, workers
    and beat alike, must see the same values, so set them in the shared environment)."""
    limits = dict(default_time_limits())
    for name in limits:
        variable = f"TIME_LIMIT_{name.upper()}"
        raw = (env.get(variable) or "").strip()
        if not raw:
            continue
        try:
            soft, hard = (float(part) for part in raw.split(","))
        except ValueError:
            raise ConfigError(f"{variable} must be 'soft,hard' in seconds, got {raw!r}") from None
        if not 0 < soft < hard:
            # The soft limit must fire first, or the child is killed before it can refund.
            raise ConfigError(f"{variable}: need 0 < soft < hard, got {raw!r}")
        limits[name] = TimeLimit(soft, hard)
    return MappingProxyType(limits)


def sqlalchemy_url(url: str) -> str:
    """Accept the usual `postgres://` / `postgresql://` forms and pick psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@dataclass(frozen=True)
class Settings:
    environment: str = "production"
    database_url: str = ""
    broker_url: str = ""
    port: int = 8000
    flower_port: int = 5555
    flower_basic_auth: str = ""
    jwt_secret: str = ""
    jwt_jwks_url: str = ""
    jwt_public_key: str = ""
    jwt_issuer: str = ""
    jwt_authorized_parties: tuple[str, ...] = ()
    jwt_admin_claim: str = "role=admin"
    jwt_leeway_seconds: int = 30
    stripe_secret_key: str = ""
    # Several while a secret is being rolled: an event signed with any of them is accepted.
    stripe_webhook_secrets: tuple[str, ...] = ()
    stripe_api_base: str = ""
    # plan id -> Stripe price id (STRIPE_PRICE_PRO, STRIPE_PRICE_ENTERPRISE)
    stripe_prices: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Beat's intervals, seconds (BEAT_*_SECONDS): monthly resets, the lost-message sweep, the
    # stuck-task reaper, Stripe reconciliation.
    beat_reset_seconds: int = 600
    beat_sweep_seconds: int = 120
    beat_reap_seconds: int = 300
    beat_reconcile_seconds: int = 300
    # Where uploads and outputs live (STORAGE_URL): "" is the local directory media_root;
    # s3://bucket[/prefix] is S3 or, with s3_endpoint_url, any S3-compatible store.
    storage_url: str = ""
    s3_endpoint_url: str = ""
    # Uploads and output files older than this many days are deleted (0: kept for ever),
    # by a beat job every beat_retention_seconds. The ledger and the task rows stay.
    retention_days: int = 0
    beat_retention_seconds: int = 3600
    # Webhooks (BEAT_WEBHOOKS_SECONDS, WEBHOOK_*): how often beat fans new events out and
    # sends due deliveries; each attempt's timeout; the delays between attempts; how long
    # an endpoint may fail every delivery before it is disabled; parallel sends per run.
    beat_webhooks_seconds: int = 5
    webhook_timeout_seconds: float = 10.0
    webhook_retry_seconds: tuple[float, ...] = WEBHOOK_RETRY_DEFAULT
    webhook_disable_after_seconds: float = 86400.0
    webhook_concurrency: int = 4
    # Requests per window (0: no limit), per user by plan and per client IP; counted in
    # Redis (RATE_LIMIT_REDIS_URL, default REDIS_URL when it is a Redis URL). Constructed
    # directly, Settings has none; from the environment the defaults below apply.
    rate_limit_plans: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    rate_limit_ip: int = 0
    rate_limit_window_seconds: int = 60
    rate_limit_redis_url: str = ""
    # Wake-ups for waiting requests and event streams (Redis pub/sub; EVENTS_REDIS_URL, default
    # REDIS_URL when it is a Redis URL). Without one, waits poll the database every
    # events_poll_seconds instead.
    events_redis_url: str = ""
    events_poll_seconds: float = 2.0
    # Seconds between `: keep-alive` comments on an idle event stream.
    events_keepalive_seconds: float = 15.0
    # Requests held by `Prefer: wait` at once in one API process; past it they answer at once.
    # Constructed directly, Settings has none (0); from the environment the default is 200.
    wait_max_per_process: int = 0
    # Proxies whose X-Forwarded-For is believed (IPs or CIDRs).
    trusted_proxies: tuple[str, ...] = ()
    # GET /metrics needs it as a bearer token (unset: nobody reads the API's metrics).
    metrics_token: str = ""
    # A worker serves its metrics on this port (0: not served), on WORKER_METRICS_ADDRESS.
    worker_metrics_port: int = 0
    worker_metrics_address: str = "127.0.0.1"
    # On SIGTERM a worker lets running tasks finish; past this many seconds (0: no limit) it
    # stops them, and their messages go back to the queue (late acks) to resume elsewhere.
    worker_shutdown_grace_seconds: float = 0.0
    frontend_url: str = "http://localhost:3000"
    media_root: Path = Path("var/media")
    log_format: str = "text"
    max_body_bytes: int = 1_048_576
    max_upload_bytes: int = 50 * 1_048_576
    max_image_pixels: int = 64_000_000
    fetch_timeout_seconds: float = 15.0
    fetch_max_bytes: int = 50 * 1_048_576
    fetch_allow_private: bool = False
    fetch_allowed_hosts: tuple[str, ...] = ()
    fetch_deadline_seconds: float = 60.0
    remote_api_base: str = ""
    remote_api_key: str = ""
    remote_model: str = ""
    remote_prompt: str = "Describe this image."
    remote_timeout_seconds: float = 60.0
    remote_max_retries: int = 3
    remote_retry_backoff_seconds: float = 1.0
    lost_message_after_seconds: int = 300
    stuck_margin_seconds: int = 120
    processor_overrides: str = ""
    time_limits: Mapping[str, TimeLimit] = field(default_factory=default_time_limits)

    @property
    def is_development(self) -> bool:
        return self.environment in ("development", "test")

    @property
    def stripe_configured(self) -> bool:
        """The routes that call Stripe work (otherwise they answer 503 billing_not_configured)."""
        return bool(self.stripe_secret_key)

    @property
    def webhook_configured(self) -> bool:
        return bool(self.stripe_webhook_secrets)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, dotenv: bool = True, broker: bool = True) -> Settings:
        """The settings of the environment; `broker=False` for a process that needs only the
        database (the CLI's database commands), which then does not require REDIS_URL."""
        if env is None:
            if dotenv:
                from dotenv import load_dotenv

                # Real environment variables win over `.env`.
                load_dotenv(os.environ.get("STUDIOX_DOTENV", ".env"), override=False)
            env = dict(os.environ)
        # Unset means production: forgetting APP_ENV must not switch on the development
        # defaults (a public JWT secret). `make run` and the tests set it explicitly.
        environment = (env.get("APP_ENV") or "production").strip().lower()
        if environment not in ENVIRONMENTS:
            raise ConfigError(f"APP_ENV must be one of {', '.join(ENVIRONMENTS)}, got {environment!r}")
        redis_url = env.get("REDIS_URL", "")
        settings = cls(
            environment=environment,
            database_url=sqlalchemy_url(env.get("DATABASE_URL", "")),
            broker_url=env.get("BROKER_URL") or redis_url,
            port=_int(env, "PORT", 8000),
            flower_port=_int(env, "FLOWER_PORT", 5555),
            flower_basic_auth=env.get("FLOWER_BASIC_AUTH", ""),
            jwt_secret=env.get("JWT_SECRET", "") or (DEV_JWT_SECRET if environment != "production" else ""),
            jwt_jwks_url=env.get("JWT_JWKS_URL", ""),
            jwt_public_key=env.get("JWT_PUBLIC_KEY", "").replace("\\n", "\n"),
            jwt_issuer=env.get("JWT_ISSUER", ""),
            jwt_authorized_parties=_split(env.get("JWT_AUTHORIZED_PARTIES")),
            jwt_admin_claim=env.get("JWT_ADMIN_CLAIM", "role=admin"),
            jwt_leeway_seconds=_int(env, "JWT_LEEWAY_SECONDS", 30),
            stripe_secret_key=env.get("STRIPE_SECRET_KEY", ""),
            stripe_webhook_secrets=_split(env.get("STRIPE_WEBHOOK_SECRET")),
            stripe_api_base=env.get("STRIPE_API_BASE", "").rstrip("/"),
            stripe_prices=MappingProxyType({
                plan: env[f"STRIPE_PRICE_{plan.upper()}"].strip()
                for plan in PAID_PLANS if (env.get(f"STRIPE_PRICE_{plan.upper()}") or "").strip()
            }),
            beat_reset_seconds=_positive(env, "BEAT_RESET_SECONDS", 600),
            beat_sweep_seconds=_positive(env, "BEAT_SWEEP_SECONDS", 120),
            beat_reap_seconds=_positive(env, "BEAT_REAP_SECONDS", 300),
            beat_reconcile_seconds=_positive(env, "BEAT_RECONCILE_SECONDS", 300),
            storage_url=(env.get("STORAGE_URL") or "").strip(),
            s3_endpoint_url=(env.get("S3_ENDPOINT_URL") or "").strip(),
            retention_days=_int(env, "RETENTION_DAYS", 0),
            beat_retention_seconds=_positive(env, "BEAT_RETENTION_SECONDS", 3600),
            beat_webhooks_seconds=_positive(env, "BEAT_WEBHOOKS_SECONDS", 5),
            webhook_timeout_seconds=_float(env, "WEBHOOK_TIMEOUT_SECONDS", 10.0),
            webhook_retry_seconds=_seconds_list(env, "WEBHOOK_RETRY_SECONDS", WEBHOOK_RETRY_DEFAULT),
            webhook_disable_after_seconds=_float(env, "WEBHOOK_DISABLE_AFTER_SECONDS", 86400.0),
            webhook_concurrency=max(1, _int(env, "WEBHOOK_CONCURRENCY", 4)),
            rate_limit_plans=MappingProxyType({
                plan: _int(env, f"RATE_LIMIT_{plan.upper()}", default)
                for plan, default in RATE_LIMIT_DEFAULTS.items()}),
            rate_limit_ip=_int(env, "RATE_LIMIT_IP", 600),
            rate_limit_window_seconds=max(1, _int(env, "RATE_LIMIT_WINDOW_SECONDS", 60)),
            rate_limit_redis_url=env.get("RATE_LIMIT_REDIS_URL") or (
                redis_url if redis_url.startswith(("redis://", "rediss://", "unix://")) else ""),
            events_redis_url=env.get("EVENTS_REDIS_URL") or (
                redis_url if redis_url.startswith(("redis://", "rediss://", "unix://")) else ""),
            events_poll_seconds=_positive_float(env, "EVENTS_POLL_SECONDS", 2.0),
            events_keepalive_seconds=_positive_float(env, "EVENTS_KEEPALIVE_SECONDS", 15.0),
            wait_max_per_process=max(0, _int(env, "WAIT_MAX_PER_PROCESS", 200)),
            trusted_proxies=_proxies(env),
            metrics_token=env.get("METRICS_TOKEN", ""),
            worker_metrics_port=_int(env, "WORKER_METRICS_PORT", 0),
            worker_metrics_address=env.get("WORKER_METRICS_ADDRESS") or "127.0.0.1",
            worker_shutdown_grace_seconds=_float(env, "WORKER_SHUTDOWN_GRACE_SECONDS", 0.0),
            frontend_url=env.get("FRONTEND_URL", "http://localhost:3000").rstrip("/"),
            media_root=Path(env.get("MEDIA_ROOT", "var/media")),
            log_format=default_format(environment, (env.get("LOG_FORMAT") or "").strip().lower() or None),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 1_048_576),
            max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", 50 * 1_048_576),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 64_000_000),
            fetch_timeout_seconds=_float(env, "FETCH_TIMEOUT_SECONDS", 15.0),
            fetch_max_bytes=_int(env, "FETCH_MAX_BYTES", 50 * 1_048_576),
            fetch_allow_private=_bool(env, "FETCH_ALLOW_PRIVATE", False),
            fetch_allowed_hosts=_split(env.get("FETCH_ALLOWED_HOSTS")),
            fetch_deadline_seconds=_float(env, "FETCH_DEADLINE_SECONDS", 60.0),
            remote_api_base=env.get("REMOTE_API_BASE", "").rstrip("/"),
            remote_api_key=env.get("REMOTE_API_KEY", ""),
            remote_model=env.get("REMOTE_MODEL", ""),
            remote_prompt=env.get("REMOTE_PROMPT") or "Describe this image.",
            remote_timeout_seconds=_float(env, "REMOTE_TIMEOUT_SECONDS", 60.0),
            remote_max_retries=_int(env, "REMOTE_MAX_RETRIES", 3),
            remote_retry_backoff_seconds=_float(env, "REMOTE_RETRY_BACKOFF_SECONDS", 1.0),
            lost_message_after_seconds=_int(env, "LOST_MESSAGE_AFTER_SECONDS", 300),
            stuck_margin_seconds=_int(env, "STUCK_MARGIN_SECONDS", 120),
            processor_overrides=env.get("PROCESSOR_OVERRIDES", ""),
            time_limits=time_limits_from_env(env),
        )
        settings.check(broker=broker)
        return settings

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    def check(self, *, broker: bool = True) -> None:
        """Refuse to run outside development with what would be unsafe or half-configured."""
        required = (("DATABASE_URL", self.database_url), ("REDIS_URL", self.broker_url))[:2 if broker else 1]
        missing = [name for name, value in required if not value]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be set")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"LOG_FORMAT must be json or text, got {self.log_format!r}")
        from storage import parse_storage_url

        try:
            parse_storage_url(self.storage_url)
        except ValueError as exc:
            raise ConfigError(f"STORAGE_URL: {exc}") from None
        if self.retention_days < 0:
            raise ConfigError(f"RETENTION_DAYS must be 0 (keep files for ever) or a number of days, "
                              f"got {self.retention_days}")
        if self.is_development or not broker:
            return  # development, or a tool that uses only the database (the CLI)
        if self.jwt_secret == DEV_JWT_SECRET:
            raise ConfigError("JWT_SECRET is the development secret; set a real one or use JWT_JWKS_URL / JWT_PUBLIC_KEY")
        if not (self.jwt_secret or self.jwt_jwks_url or self.jwt_public_key):
            raise ConfigError("JWT_JWKS_URL or JWT_PUBLIC_KEY must be set outside development")
        if self.stripe_secret_key and not self.stripe_webhook_secrets:
            raise ConfigError("STRIPE_WEBHOOK_SECRET must be set when STRIPE_SECRET_KEY is")
        if self.stripe_webhook_secrets and not self.stripe_secret_key:
            raise ConfigError("STRIPE_SECRET_KEY must be set when STRIPE_WEBHOOK_SECRET is")
