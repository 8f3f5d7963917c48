"""The contract as code: /openapi.json documents exactly the routes the app serves, /docs
shows it, and schemathesis holds every answer of the real app to it.

The fuzzing runs in process (WSGI) against committed data in the e2e database, as a real
user on the enterprise plan with credits, with every schemathesis check on every operation,
then statefully along the document's links (create → read → cancel → output). Examples
per operation are bounded and the generation is derandomized, so a failure reproduces.
"""

from __future__ import annotations

import uuid

import falcon.inspect
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from api.app import create_app, routes
from api.openapi import build_document
from models.db import session_scope
from settings import Settings
from tests.support.builders import make_user
from tests.support.env import isolated_broker
from tests.support.fake_stripe import FakeStripe
from worker.queue import TaskQueue, create_celery

ISOLATED_REDIS_DB = 14  # tasks the fuzzer creates are queued where no worker consumes
EXAMPLES_PER_OPERATION = 60
STATEFUL_EXAMPLES = 20
STATEFUL_STEPS = 12


def _document_operations(document: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in document["paths"].items() for method in item}


def _app_operations(app) -> set[tuple[str, str]]:
    return {(route.path, method.method) for route in falcon.inspect.inspect_routes(app)
            for method in route.methods if not method.internal}


class TestDocument:
    def test_every_route_is_documented_and_nothing_else(self, client, app):
        document = client.simulate_get("/openapi.json").json
        assert document["openapi"].startswith("3.1")
        assert _document_operations(document) == _app_operations(app)

    def test_the_check_fails_for_an_undocumented_route(self, client, app):
        class Extra:
            def on_get(self, req, resp):
                resp.media = {}

        app.add_route("/api/undocumented", Extra())
        document = client.simulate_get("/openapi.json").json
        assert _app_operations(app) - _document_operations(document) == {("/api/undocumented", "GET")}

    def test_task_params_show_every_option_with_range_and_default(self, client):
        schemas = client.simulate_get("/openapi.json").json["components"]["schemas"]
        rotate = schemas["RotateOp"]["properties"]["degrees"]
        assert (rotate["minimum"], rotate["maximum"]) == (-360, 360)
        assert schemas["VideoParams"]["properties"]["fps"]["default"] == 25
        operation = schemas["EditParams"]["properties"]["operations"]["items"]["anyOf"][0]
        assert operation["discriminator"]["propertyName"] == "op"
        assert {"resize", "crop", "rotate", "watermark", "auto_orient"} <= set(operation["discriminator"]["mapping"])

    def test_every_operation_documents_its_errors_with_the_error_schema(self, client):
        document = client.simulate_get("/openapi.json").json
        create = document["paths"]["/api/tasks/create"]["post"]["responses"]
        assert {"400", "401", "402", "403", "404", "405", "409", "413", "415", "429", "503"} <= set(create)
        assert create["402"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert document["paths"]["/api/tasks/{task_id}/status"]["patch"]["security"] == [{"bearerAuth": []}]
        assert document["paths"]["/health"]["get"]["security"] == []

    def test_the_wait_routes_document_the_headers_they_take_and_answer(self, client):
        paths = client.simulate_get("/openapi.json").json["paths"]
        for path, method, status in (("/api/tasks/create", "post", "201"), ("/api/tasks/{task_id}/retry", "post", "201"),
                                     ("/api/tasks/{task_id}", "get", "200")):
            op = paths[path][method]
            assert "Prefer" in [p["name"] for p in op["parameters"]]
            assert "Preference-Applied" in op["responses"][status]["headers"]
        assert "Idempotent-Replayed" in paths["/api/tasks/create"]["post"]["responses"]["200"]["headers"]
        assert "Last-Event-ID" in [p["name"] for p in paths["/api/tasks/{task_id}/events"]["get"]["parameters"]]

    def test_docs_page_uses_assets_served_by_the_app(self, client):
        page = client.simulate_get("/docs")
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "/docs/assets/swagger-ui-bundle.js" in page.text and "/openapi.json" in page.text
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            served = client.simulate_get(f"/docs/assets/{asset}")
            assert served.status_code == 200 and len(served.content) > 10_000
        assert "//cdn" not in page.text and "unpkg" not in page.text


# --- fuzzing -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_stripe():
    server = FakeStripe().start()
    server.prices.update({"price_pro": 1900, "price_enterprise": 9900})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fuzz_app(e2e_settings, e2e_engine, fuzz_stripe):
    # Billing configured against the stand-in Stripe, so its routes answer for real.
    isolated = isolated_broker(e2e_settings, ISOLATED_REDIS_DB).with_(
        stripe_secret_key="sk_test_fuzz", stripe_webhook_secrets=("whsec_fuzz",), stripe_api_base=fuzz_stripe.url,
        stripe_prices={"pro": "price_pro", "enterprise": "price_enterprise"})
    return create_app(isolated, engine=e2e_engine, queue=TaskQueue(create_celery(isolated)))


@pytest.fixture(scope="module")
def fuzz_identities(fuzz_app, e2e_engine, make_token):
    """A real user on the enterprise plan with plenty of credits, and an operator."""
    from models.db import make_session_factory

    clerk_id = f"fuzz_{uuid.uuid4().hex[:10]}"
    with session_scope(make_session_factory(e2e_engine)) as session:
        make_user(session, plan="enterprise", purchased=1_000_000, clerk_id=clerk_id, email="fuzz@example.com",
                  name="Fuzz")
    return {"user": make_token(clerk_id, ttl=3600), "admin": make_token(clerk_id, ttl=3600, role="admin")}


CONFIG = SchemathesisConfig.from_dict({
    "seed": 20261129,
    # The stateful run follows the document's own links only: links schemathesis infers from
    # what earlier steps returned (a webhook list that is empty one time and not the next)
    # make hypothesis draw differently between runs, which it refuses as flaky.
    "phases": {"stateful": {"inference": {"algorithms": []}}},
    "checks": {
        # Valid by the schema may still be refused by a rule the schema cannot state across
        # fields (video width without height, a type's params, an unknown upload id): 400/404,
        # and a real user meets 402 (credits), 409 (key reuse, final task) and 429 (in flight).
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "402", "403", "404", "409", "429"]},
    },
    "operations": [{
        # Billing's own rules: an unknown pack or plan (400), a plan change or portal with no
        # subscription or customer (409), a signature the fuzzer cannot make (400).
        "include-path-regex": "^/api/(billing/|users/upgrade-plan)",
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "409"]},
        },
    }, {
        # Any bytes fit a binary schema; only an image's bytes are accepted (415 otherwise).
        "include-operation-id": "post_api_uploads",
        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "411", "415"]}},
    }, {
        # A pending task's event stream stays open (keep-alives) until the task ends: its
        # first event is enough to check against the document.
        "include-operation-id": "get_api_tasks_task_id_events",
        "max-stream-events": 1,
    }],
})


class LateApp:
    """The WSGI app the fuzzer calls, set by a fixture once the test servers run."""

    app = None
    identities: dict[str, str] = {"user": "", "admin": ""}

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


TARGET = LateApp()
# The document is built from the route table alone (no server needed), so the operations
# can be collected as tests; each call goes to the real app (see `api_schema`).
schema = schemathesis.openapi.from_dict(build_document(routes(Settings(), None, None, None)), config=CONFIG)
schema.app = TARGET


@schema.auth(refresh_interval=None)
class BearerTokens:
    """The fuzzing user's token; the operator's for the operator-only route. Given through
    schemathesis' auth hooks, so its `ignored_auth` check can still send bad credentials."""

    def get(self, case, ctx):
        return TARGET.identities["admin" if case.path.endswith("/status") else "user"]

    def set(self, case, token, ctx):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def api_schema(fuzz_app, fuzz_identities):
    TARGET.app, TARGET.identities = fuzz_app, fuzz_identities
    # What the app serves is what was collected.
    assert _document_operations(schema.raw_schema) == _app_operations(fuzz_app)
    return schema


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_document(case, api_schema):
    case.call_and_validate()


def test_stateful_workflows_match_the_document(api_schema):
    """create → read / cancel / output, upload → read, along the document's links."""
    api_schema.as_state_machine().run(settings=settings(
        max_examples=STATEFUL_EXAMPLES, stateful_step_count=STATEFUL_STEPS, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck)))
