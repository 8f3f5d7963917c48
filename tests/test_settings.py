"""Settings.from_env: safe development defaults, refusals outside development."""

from __future__ import annotations

from pathlib import Path

import pytest

from settings import DEV_JWT_SECRET, ConfigError, Settings, sqlalchemy_url

SERVERS = {"DATABASE_URL": "postgresql://app:pw@db.internal:5432/studiox", "REDIS_URL": "redis://cache.internal:6379/0"}
BASE = {**SERVERS, "APP_ENV": "development"}
PRODUCTION = {**SERVERS, "APP_ENV": "production", "JWT_JWKS_URL": "https://clerk.example.com/.well-known/jwks.json"}


def from_env(**env: str) -> Settings:
    return Settings.from_env(env, dotenv=False)


class TestProductionRefusesInsecureConfig:
    def test_development_jwt_secret_is_refused_naming_the_variable(self):
        with pytest.raises(ConfigError, match="JWT_SECRET"):
            from_env(**{**BASE, "APP_ENV": "production", "JWT_SECRET": DEV_JWT_SECRET})

    def test_development_jwt_secret_is_refused_even_beside_a_jwks_url(self):
        with pytest.raises(ConfigError, match="JWT_SECRET"):
            from_env(**{**PRODUCTION, "JWT_SECRET": DEV_JWT_SECRET})

    def test_no_jwt_configuration_is_refused_naming_the_variables(self):
        with pytest.raises(ConfigError, match="JWT_JWKS_URL") as caught:
            from_env(**{**BASE, "APP_ENV": "production"})
        assert "JWT_PUBLIC_KEY" in str(caught.value)

    def test_production_never_falls_back_to_the_development_secret(self):
        settings = from_env(**PRODUCTION)
        assert settings.jwt_secret == ""

    def test_stripe_secret_key_without_webhook_secret_is_refused(self):
        with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRET"):
            from_env(**{**PRODUCTION, "STRIPE_SECRET_KEY": "sk_live_abc"})

    def test_webhook_secret_without_stripe_secret_key_is_refused(self):
        with pytest.raises(ConfigError, match="STRIPE_SECRET_KEY"):
            from_env(**{**PRODUCTION, "STRIPE_WEBHOOK_SECRET": "whsec_abc"})

    def test_webhook_secrets_are_a_comma_list_while_one_is_rolled(self):
        settings = from_env(**PRODUCTION, STRIPE_SECRET_KEY="sk_live_abc", STRIPE_WEBHOOK_SECRET="whsec_new, whsec_old")
        assert settings.stripe_webhook_secrets == ("whsec_new", "whsec_old")

    def test_each_paid_plan_reads_its_stripe_price(self):
        settings = from_env(**BASE, STRIPE_PRICE_PRO="price_pro", STRIPE_PRICE_ENTERPRISE=" ")
        assert dict(settings.stripe_prices) == {"pro": "price_pro"}  # a blank one is unset: not for sale

    def test_reconcile_interval_is_read(self):
        assert from_env(**BASE).beat_reconcile_seconds == 300
        assert from_env(**BASE, BEAT_RECONCILE_SECONDS="60").beat_reconcile_seconds == 60
        with pytest.raises(ConfigError, match="BEAT_RECONCILE_SECONDS"):
            from_env(**BASE, BEAT_RECONCILE_SECONDS="often")

    def test_beat_intervals_make_beats_schedule(self):
        from worker.queue import create_celery

        settings = from_env(**BASE, BEAT_RESET_SECONDS="7", BEAT_SWEEP_SECONDS="8", BEAT_REAP_SECONDS="9",
                            BEAT_RECONCILE_SECONDS="10", BEAT_WEBHOOKS_SECONDS="2")
        schedule = {entry["task"]: entry["schedule"] for entry in create_celery(settings).conf.beat_schedule.values()}
        assert schedule == {"maintenance.reset_monthly_credits": 7.0, "maintenance.sweep_lost_messages": 8.0,
                            "maintenance.reap_stuck_tasks": 9.0, "maintenance.reconcile_stripe": 10.0,
                            "maintenance.deliver_webhooks": 2.0}
        defaults = create_celery(from_env(**BASE)).conf.beat_schedule
        assert defaults["reset-monthly-credits"]["schedule"] == 600.0
        with pytest.raises(ConfigError, match="BEAT_SWEEP_SECONDS"):
            from_env(**BASE, BEAT_SWEEP_SECONDS="0")
        assert defaults["deliver-webhooks"]["schedule"] == 5.0

    def test_webhook_settings_are_read(self):
        defaults = from_env(**BASE)
        assert (defaults.webhook_timeout_seconds, defaults.webhook_disable_after_seconds) == (10.0, 86400.0)
        assert defaults.webhook_retry_seconds[:3] == (5.0, 30.0, 120.0) and sum(defaults.webhook_retry_seconds) < 86400
        shrunk = from_env(**BASE, WEBHOOK_RETRY_SECONDS="0.5, 1,2", WEBHOOK_DISABLE_AFTER_SECONDS="5")
        assert (shrunk.webhook_retry_seconds, shrunk.webhook_disable_after_seconds) == ((0.5, 1.0, 2.0), 5.0)
        with pytest.raises(ConfigError, match="WEBHOOK_RETRY_SECONDS"):
            from_env(**BASE, WEBHOOK_RETRY_SECONDS="soon")

    @pytest.mark.parametrize("missing", ["DATABASE_URL", "REDIS_URL"])
    def test_missing_database_or_broker_is_refused_naming_it(self, missing):
        env = {k: v for k, v in PRODUCTION.items() if k != missing}
        with pytest.raises(ConfigError, match=missing):
            from_env(**env)

    def test_unknown_environment_is_refused(self):
        with pytest.raises(ConfigError, match="APP_ENV"):
            from_env(**{**BASE, "APP_ENV": "staging"})

    @pytest.mark.parametrize("name", ["PORT", "MAX_BODY_BYTES", "FETCH_TIMEOUT_SECONDS"])
    def test_non_numeric_number_is_a_config_error_naming_it(self, name):
        with pytest.raises(ConfigError, match=name):
            from_env(**{**BASE, name: "lots"})

    def test_complete_production_config_is_accepted(self):
        settings = from_env(**PRODUCTION, STRIPE_SECRET_KEY="sk_live_abc", STRIPE_WEBHOOK_SECRET="whsec_abc",
                            JWT_ISSUER="https://clerk.example.com", JWT_AUTHORIZED_PARTIES="https://app.example.com, https://x.example.com")
        assert not settings.is_development
        assert settings.stripe_configured and settings.webhook_configured
        assert settings.jwt_authorized_parties == ("https://app.example.com", "https://x.example.com")


class TestUnsetEnvironmentIsProduction:
    def test_forgetting_app_env_does_not_enable_the_development_secret(self):
        with pytest.raises(ConfigError, match="JWT"):
            from_env(**SERVERS)

    def test_unset_app_env_with_real_keys_is_production(self):
        settings = from_env(**SERVERS, JWT_JWKS_URL="https://clerk.example.com/.well-known/jwks.json")
        assert settings.environment == "production" and not settings.is_development
        assert settings.jwt_secret == ""


class TestDevelopmentDefaults:
    def test_development_works_with_only_database_and_broker(self):
        settings = from_env(**BASE)
        assert settings.environment == "development"
        assert settings.is_development
        assert settings.jwt_secret == DEV_JWT_SECRET
        assert settings.port == 8000
        assert settings.flower_port == 5555
        assert settings.jwt_admin_claim == "role=admin"
        assert settings.frontend_url == "http://localhost:3000"
        assert settings.media_root == Path("var/media")
        assert not settings.stripe_configured and not settings.webhook_configured
        assert settings.broker_url == BASE["REDIS_URL"]

    def test_broker_url_overrides_redis_url(self):
        settings = from_env(**BASE, BROKER_URL="amqp://guest:guest@rabbit:5672//")
        assert settings.broker_url == "amqp://guest:guest@rabbit:5672//"

    def test_explicit_values_are_read(self):
        settings = from_env(**SERVERS, APP_ENV="test", PORT="9001", JWT_SECRET="s" * 40, FRONTEND_URL="https://app.example.com/",
                            JWT_PUBLIC_KEY="-----BEGIN PUBLIC KEY-----\\nABC\\n-----END PUBLIC KEY-----")
        assert settings.port == 9001
        assert settings.jwt_secret == "s" * 40
        assert settings.frontend_url == "https://app.example.com"  # no trailing slash: CORS compares exactly
        assert settings.jwt_public_key.splitlines() == ["-----BEGIN PUBLIC KEY-----", "ABC", "-----END PUBLIC KEY-----"]


class TestDatabaseUrls:
    @pytest.mark.parametrize("given", ["postgres://app:pw@db:5432/studiox", "postgresql://app:pw@db:5432/studiox"])
    def test_postgres_urls_use_psycopg3(self, given):
        assert sqlalchemy_url(given) == "postgresql+psycopg://app:pw@db:5432/studiox"
        assert from_env(**{**BASE, "DATABASE_URL": given}).database_url == "postgresql+psycopg://app:pw@db:5432/studiox"

    def test_explicit_driver_is_kept(self):
        assert sqlalchemy_url("postgresql+psycopg://app@db/x") == "postgresql+psycopg://app@db/x"
