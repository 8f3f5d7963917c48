"""Every error in the contract's shape, request ids, body limits and CORS, through create_app."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid

import falcon
import pytest
from sqlalchemy import text
from falcon import testing

from api.app import create_app
from api.middleware import BodyLimitMiddleware
from models import User
from tests.support.http import bearer

ERROR_KEYS = {"error", "statusCode", "code"}
SECRET_DETAIL = "db password is hunter2"


def assert_error(result, status: int, code: str | None = None) -> dict:
    assert result.status_code == status, result.text
    assert result.headers["Content-Type"].startswith("application/json")
    body = result.json
    # `details` (every failing field) comes with validation errors only.
    assert set(body) - {"details"} == ERROR_KEYS, body
    if "details" in body:
        assert status == 400 and all({"path", "message", "type"} == set(d) for d in body["details"]), body
    assert body["statusCode"] == status
    assert isinstance(body["error"], str) and body["error"]
    if code is not None:
        assert body["code"] == code, body
    return body


class Boom:
    auth = None
    uses_db = False

    def on_get(self, req, resp):
        raise RuntimeError(SECRET_DETAIL)


class BrokenCommit:
    """Leaves a row the database refuses at commit time (unknown plan)."""

    auth = None

    def on_post(self, req, resp):
        req.context.session.add(User(clerk_id=f"user_{uuid.uuid4().hex}", plan_id="no-such-plan"))
        resp.media = {"ok": True}


class SlowQuery:
    """A statement the database cancels (statement_timeout): an OperationalError that is not
    the database being down."""

    auth = None

    def on_get(self, req, resp):
        req.context.session.execute(text("SET LOCAL statement_timeout = '10ms'"))
        req.context.session.execute(text("SELECT pg_sleep(1)"))


class Echo:
    auth = None
    uses_db = False

    def on_post(self, req, resp):
        resp.media = {"received": req.get_media()}


@pytest.fixture
def small_app(settings, engine, session_factory, task_queue):
    """The app with a 64-byte body limit and a few test-only routes."""
    app = create_app(settings.with_(max_body_bytes=64), engine=engine, session_factory=session_factory, queue=task_queue)
    app.add_route("/test/boom", Boom())
    app.add_route("/test/broken-commit", BrokenCommit())
    app.add_route("/test/slow-query", SlowQuery())
    app.add_route("/test/echo", Echo())
    return app


@pytest.fixture
def small(small_app) -> testing.TestClient:
    return testing.TestClient(small_app)


class TestRoutingErrors:
    def test_unknown_route_is_404_in_contract_shape(self, client):
        assert_error(client.simulate_get("/api/nothing-here"), 404, "not_found")

    def test_unknown_route_with_body_is_404_not_413(self, small):
        assert_error(small.simulate_post("/api/nothing-here", body="x" * 1000), 404)

    def test_errors_are_json_whatever_the_client_accepts(self, client):
        assert_error(client.simulate_get("/api/nothing-here", headers={"Accept": "application/xml"}), 404)

    def test_wrong_method_is_405_in_contract_shape(self, client):
        result = client.simulate_delete("/health")
        assert_error(result, 405, "method_not_allowed")
        assert "GET" in result.headers["Allow"]

    def test_wrong_method_on_user_route_is_405(self, client, user_headers):
        assert_error(client.simulate_delete("/api/users/me", headers=user_headers), 405, "method_not_allowed")

    def test_wrong_method_on_user_route_is_405_even_without_a_token(self, client):
        assert_error(client.simulate_delete("/api/users/me"), 405, "method_not_allowed")


class TestRequestBodyErrors:
    def test_malformed_json_is_400_invalid_json(self, client, user_headers):
        result = client.simulate_post("/api/users/initialize", headers={**user_headers, "Content-Type": "application/json"},
                                      body='{"name": "unterminated')
        assert_error(result, 400, "invalid_json")

    def test_wrong_content_type_is_415(self, client, user_headers):
        result = client.simulate_post("/api/users/initialize", headers={**user_headers, "Content-Type": "text/plain"},
                                      body="name=alice")
        assert_error(result, 415, "unsupported_media_type")

    @pytest.mark.parametrize("body", ["[1, 2, 3]", '"a string"', "42", "null"])
    def test_json_body_that_is_not_an_object_is_400(self, client, user_headers, body):
        result = client.simulate_post("/api/users/initialize", headers={**user_headers, "Content-Type": "application/json"},
                                      body=body)
        assert_error(result, 400)

    def test_body_over_limit_with_content_length_is_413(self, small, make_token):
        result = small.simulate_post("/api/users/initialize", headers=bearer(make_token()), json={"name": "x" * 100})
        assert_error(result, 413, "payload_too_large")

    def test_an_anonymous_body_is_refused_before_it_is_read(self, small):
        # Authentication comes first: an anonymous client learns nothing about the limits.
        assert_error(small.simulate_post("/api/users/initialize", json={"name": "x" * 100}), 401)

    def test_body_over_limit_is_413(self, small, make_token):
        assert_error(small.simulate_post("/api/users/initialize", headers=bearer(make_token()),
                                         json={"name": "x" * 100}), 413)

    def test_body_at_limit_is_accepted(self, small):
        body = json.dumps({"n": "x" * 50})
        body += " " * (64 - len(body))
        result = small.simulate_post("/test/echo", headers={"Content-Type": "application/json"}, body=body)
        assert result.status_code == 200, result.text
        assert result.json == {"received": {"n": "x" * 50}}

    def test_chunked_body_over_limit_is_413(self, small, make_token):
        # No Content-Length: the server de-chunks the body and cannot say how long it is.
        result = small.simulate_request(
            "POST", "/api/users/initialize",
            headers={**bearer(make_token()), "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            extras={"wsgi.input": io.BytesIO(json.dumps({"name": "x" * 10_000}).encode())},
        )
        assert "CONTENT_LENGTH" not in result.headers  # sanity: nothing told the app the length
        assert_error(result, 413, "payload_too_large")

    def test_chunked_body_under_limit_is_read(self, small, make_token):
        result = small.simulate_request(
            "POST", "/api/users/initialize",
            headers={**bearer(make_token()), "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            extras={"wsgi.input": io.BytesIO(b'{"name": "Chunky"}')},
        )
        assert result.status_code == 201, result.text
        assert result.json["user"]["name"] == "Chunky"

    def test_capped_stream_refuses_past_the_limit_through_wsgi(self):
        """The capped reader as a WSGI server drives it: no length, reads until refused."""
        middleware = BodyLimitMiddleware(16)

        class Raw:
            auth = None
            max_body_bytes = None

            def on_post(self, req, resp):
                resp.media = {"bytes": len(req.stream.read())}

        app = falcon.App(middleware=[middleware])
        app.add_route("/raw", Raw())
        client = testing.TestClient(app)
        ok = client.simulate_request("POST", "/raw", extras={"wsgi.input": io.BytesIO(b"y" * 16)},
                                     headers={"Transfer-Encoding": "chunked"})
        assert ok.json == {"bytes": 16}
        too_big = client.simulate_request("POST", "/raw", extras={"wsgi.input": io.BytesIO(b"y" * 17)},
                                          headers={"Transfer-Encoding": "chunked"})
        assert too_big.status_code == 413


class TestUnhandledErrors:
    def test_unhandled_exception_is_500_without_details(self, small):
        result = small.simulate_get("/test/boom")
        assert result.status_code == 500
        assert result.json == {"error": "Internal server error", "statusCode": 500, "code": "internal_error"}
        for leak in (SECRET_DETAIL, "Traceback", "RuntimeError", "File \""):
            assert leak not in result.text

    def test_unhandled_exception_is_logged_with_request_id(self, small, caplog):
        caplog.set_level(logging.ERROR, logger="studiox.api")
        result = small.simulate_get("/test/boom", headers={"X-Request-ID": "req-boom-42"})
        assert result.status_code == 500
        assert result.headers["X-Request-ID"] == "req-boom-42"
        records = [r for r in caplog.records if "req-boom-42" in r.getMessage()]
        assert records, [r.getMessage() for r in caplog.records]
        assert records[0].exc_info and records[0].exc_info[0] is RuntimeError

    def test_failure_at_commit_is_500_in_contract_shape(self, small):
        result = small.simulate_post("/test/broken-commit")
        assert result.status_code == 500, result.text
        assert result.json == {"error": "Internal server error", "statusCode": 500, "code": "internal_error"}
        assert "no-such-plan" not in result.text

    def test_a_cancelled_statement_is_a_500_not_a_retryable_503(self, small):
        # Only an unreachable database is 503 database_unavailable; a timeout or a limit is a bug to fix.
        result = small.simulate_get("/test/slow-query")
        assert result.status_code == 500, result.text
        assert result.json["code"] == "internal_error"

    def test_domain_error_keeps_its_status_and_code(self, client, make_token):
        assert_error(client.simulate_get("/api/users/me", headers=bearer(make_token())), 404, "user_not_found")


class TestRequestId:
    def test_sane_request_id_is_echoed(self, client):
        result = client.simulate_get("/health", headers={"X-Request-ID": "abc-123.DEF_4"})
        assert result.headers["X-Request-ID"] == "abc-123.DEF_4"

    def test_missing_request_id_is_generated(self, client):
        first = client.simulate_get("/health").headers["X-Request-ID"]
        second = client.simulate_get("/health").headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", first) and re.fullmatch(r"[0-9a-f]{32}", second)
        assert first != second

    @pytest.mark.parametrize("given", ["has spaces", "x" * 129, "semi;colon", "<script>", "a/b", "abc\x00"])
    def test_insane_request_id_is_replaced(self, client, given):
        echoed = client.simulate_get("/health", headers={"X-Request-ID": given}).headers["X-Request-ID"]
        assert echoed != given
        assert re.fullmatch(r"[0-9a-f]{32}", echoed)

    def test_request_id_is_echoed_on_errors(self, client):
        for result in (
            client.simulate_get("/api/nothing", headers={"X-Request-ID": "err-1"}),
            client.simulate_get("/api/users/me", headers={"X-Request-ID": "err-1"}),
            client.simulate_put("/health", headers={"X-Request-ID": "err-1"}),
        ):
            assert result.status_code >= 400
            assert result.headers["X-Request-ID"] == "err-1"


class TestCors:
    PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization, Content-Type"}

    def test_preflight_from_frontend_is_allowed(self, client, settings):
        result = client.simulate_options("/api/tasks/create", headers={"Origin": settings.frontend_url, **self.PREFLIGHT})
        assert result.status_code == 200
        assert result.headers["Access-Control-Allow-Origin"] == settings.frontend_url
        assert "POST" in result.headers["Access-Control-Allow-Methods"]
        assert "authorization" in result.headers["Access-Control-Allow-Headers"].lower()

    def test_preflight_from_another_origin_is_not_allowed(self, client):
        result = client.simulate_options("/api/tasks/create", headers={"Origin": "https://evil.test", **self.PREFLIGHT})
        assert "Access-Control-Allow-Origin" not in result.headers

    def test_frontend_can_read_error_responses_and_request_id(self, client, settings):
        result = client.simulate_get("/api/users/me", headers={"Origin": settings.frontend_url})
        assert_error(result, 401)
        assert result.headers["Access-Control-Allow-Origin"] == settings.frontend_url
        assert "x-request-id" in result.headers["Access-Control-Expose-Headers"].lower()

    def test_other_origin_gets_no_cors_headers_on_simple_requests(self, client):
        result = client.simulate_get("/health", headers={"Origin": "https://evil.test"})
        assert "Access-Control-Allow-Origin" not in result.headers
