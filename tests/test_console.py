"""The console at `/`: a reference client on the public contract, served with a
Content-Security-Policy that allows only itself, and driven here in headless Chromium
against the real API under gunicorn, a real worker with the real processors, and the e2e
database. Each state it reaches is kept as a screenshot in var/test-artifacts/console/.

Without Chromium (Debian's `chromium`) or the playwright package the browser tests skip
with what to install; the serving tests run anyway.
"""

from __future__ import annotations

import io
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from api.console import CONTENT_SECURITY_POLICY
from devenv.run import DEV_CLERK_ID, DEV_CREDITS, DEV_MIN_CREDITS, banner, ensure_dev_user
from models.credits import adjust_credits
from models.db import session_scope
from models.plans import get_plan
from models.users import User
from tasktypes import TASK_TYPE_SPECS
from tests.support.browser import Browser, require_browser, screenshot
from tests.support.builders import image_bytes, make_user
from tests.support.env import isolated_broker, worker_env
from tests.support.web import Gunicorn
from tests.support.workers import ALL_QUEUES, CeleryWorker
from tests.test_processors_image_analysis import drawn_face
from worker.queue import create_celery

CONSOLE_REDIS_DB = 3  # this module's worker consumes here, and nothing else does meanwhile


# --- serving: no browser needed -------------------------------------------------------------------

class TestServing:
    def test_the_page_allows_only_itself(self, client):
        page = client.simulate_get("/")
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        csp = page.headers["Content-Security-Policy"]
        assert csp == CONTENT_SECURITY_POLICY
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        # Every script is a file of this origin: nothing inline, nothing from a CDN.
        scripts = re.findall(r"<script\b[^>]*>", page.text)
        assert scripts and all('src="/console/' in tag for tag in scripts)
        assert "//" not in "".join(re.findall(r'(?:src|href)="([^"]*)"', page.text))

    def test_assets_are_served_with_the_same_policy_and_nothing_else_is(self, client):
        for asset, kind in (("app.js", "text/javascript"), ("console.css", "text/css"),
                            ("favicon.svg", "image/svg+xml")):
            served = client.simulate_get(f"/console/{asset}")
            assert served.status_code == 200 and served.headers["Content-Type"].startswith(kind)
            assert served.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        for missing in ("index.html", "..%2Fapi%2Fapp.py", "nope.js"):
            answer = client.simulate_get(f"/console/{missing}")
            assert answer.status_code == 404 and answer.json["statusCode"] == 404

    def test_the_console_has_no_token_and_no_api_of_its_own(self, client):
        document = client.simulate_get("/openapi.json").json
        assert document["paths"]["/"]["get"]["security"] == []
        ours = {path for path in document["paths"] if path == "/" or path.startswith("/console")}
        assert ours == {"/", "/console/{asset}"}
        assert not any(m != "get" for p in ours for m in document["paths"][p])
        assert "eyJ" not in client.simulate_get("/").text
        # CORS is the API's, untouched: the console is same-origin and needs none.
        answer = client.simulate_get("/", headers={"Origin": "http://elsewhere.test"})
        assert "Access-Control-Allow-Origin" not in answer.headers


class TestDevelopmentHandOff:
    def test_make_run_prints_a_console_link_carrying_the_token_in_its_fragment(self):
        text = banner(environment="development", api_url="http://127.0.0.1:8000", flower_url="http://127.0.0.1:5555",
                      flower_auth="admin:x", database="db", broker="redis", token="tok.en.value")
        assert "Console   http://127.0.0.1:8000/#token=tok.en.value" in text
        assert re.search(r"token:\s+(\S+)", text).group(1) == "tok.en.value"  # the banner's own line stays first

    def test_the_development_user_may_try_every_type_with_credits_to_spend(self, e2e_db, e2e_settings):
        assert ensure_dev_user(e2e_settings.database_url, development=True) is True
        assert ensure_dev_user(e2e_settings.database_url, development=True) is False  # a second run: no new grant
        with session_scope(e2e_db) as session:
            user = session.query(User).filter_by(clerk_id=DEV_CLERK_ID).one()
            plan = get_plan(session, user.plan_id)
            assert all(plan.allows(t) for t in TASK_TYPE_SPECS)
            assert user.credits >= DEV_MIN_CREDITS
            adjust_credits(session, user.id, -user.plan_credits, bucket="plan", reason="spent")
        ensure_dev_user(e2e_settings.database_url, development=True)  # a later run finds it spent
        with session_scope(e2e_db) as session:
            user = session.query(User).filter_by(clerk_id=DEV_CLERK_ID).one()
            assert user.credits == DEV_CREDITS

    def test_outside_development_the_user_is_left_as_it_is(self, e2e_db, e2e_settings):
        ensure_dev_user(e2e_settings.database_url, development=False)
        with session_scope(e2e_db) as session:
            user = session.query(User).filter_by(clerk_id=DEV_CLERK_ID).one()
            assert user.plan_id == "free"


# --- in a browser ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    executable = require_browser()
    chromium = Browser(executable)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def console_settings(e2e_settings):
    return isolated_broker(e2e_settings, CONSOLE_REDIS_DB)


@pytest.fixture(scope="module")
def api_server(browser, console_settings, tmp_path_factory):
    log = tmp_path_factory.mktemp("console-logs") / "gunicorn.log"
    server = Gunicorn(worker_env(console_settings), log_path=log).start()
    server.url = f"http://127.0.0.1:{server.port}"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def media_worker(browser, console_settings, tmp_path_factory):
    """The real processors (no PROCESSOR_OVERRIDES) on every queue."""
    log = tmp_path_factory.mktemp("console-logs") / "worker.log"
    worker = CeleryWorker(worker_env(console_settings), queues=ALL_QUEUES, concurrency=2, log_path=log)
    worker.start(create_celery(console_settings))
    yield worker
    worker.stop()


@dataclass
class Member:
    clerk_id: str
    token: str


def member_with(e2e_db, make_token, **plan) -> Member:
    clerk_id = f"console_{uuid.uuid4().hex[:10]}"
    with session_scope(e2e_db) as session:
        make_user(session, clerk_id=clerk_id, email=f"{clerk_id}@example.com", **plan)
    return Member(clerk_id, make_token(clerk_id, ttl=3600))


@pytest.fixture
def console(browser, api_server, media_worker, e2e_db, make_token):
    """Opens the console signed in as a new pro user with credits: `open(member=None)`."""
    def open_(member: Member | None = None):
        member = member or member_with(e2e_db, make_token, plan="pro", purchased=200)
        page = browser.page()
        page.goto(f"{api_server.url}/#token={member.token}")
        page.wait_for_selector("body[data-ready=true]")
        return page

    yield open_
    browser.close_pages()


def png(tmp_path: Path, name: str, image: Image.Image) -> Path:
    path = tmp_path / name
    image.save(path, "PNG")
    return path


def face_scene() -> Image.Image:
    scene = Image.new("RGB", (480, 360), (120, 150, 170))
    scene.paste(drawn_face(180), (250, 80))
    return scene


def choose(page, task_type: str, *files: Path) -> None:
    page.select_option("#task-type", task_type)
    page.set_input_files("#task-file", [str(f) for f in files])
    page.wait_for_function("n => document.querySelectorAll('#uploads li[data-upload]').length === n", arg=len(files))


def submit_and_wait(page, task_type: str, status: str = "completed", timeout: float = 60_000):
    page.click("#submit-task")
    row = page.locator(f"tr.task[data-type={task_type}]").first
    row.wait_for()
    page.wait_for_selector(f"tr.task[data-type={task_type}][data-status={status}]", timeout=timeout)
    return row


def explain(page) -> str:
    return "\n".join(page.messages[-20:])


@pytest.mark.e2e
@pytest.mark.timeout(180)
class TestConsoleInABrowser:
    def test_an_edit_completes_live_and_shows_the_edited_image(self, console, tmp_path):
        page = console()
        assert "#token" not in page.url  # taken out of the address bar once kept in the tab
        choose(page, "advanced_editing", png(tmp_path, "in.png", Image.open(io.BytesIO(
            image_bytes("PNG", (96, 64), (40, 120, 220))))))
        # The params form comes from the schema: add operations by name, fill their options.
        page.select_option('select[name="params.operations-add"]', "rotate")
        page.fill('[name="params.operations[0].degrees"]', "90")
        page.select_option('select[name="params.operations-add"]', "grayscale")
        page.select_option('[name="params.format"]', "png")
        page.wait_for_selector("#estimate [data-cost='2']")
        assert "would be accepted" in page.inner_text("#estimate")
        screenshot(page, "01-edit-form-with-estimate")

        submit_and_wait(page, "advanced_editing")
        image = page.wait_for_selector("#output img.output-image:not(.input-image)")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image)
        size = page.evaluate("img => [img.naturalWidth, img.naturalHeight]", image)
        assert size == [64, 96], explain(page)  # rotated a quarter turn
        assert page.locator("#output img.input-image").count() == 1  # beside the original
        assert not [m for m in page.messages if "error" in m], explain(page)
        assert "Server-Sent Events" in page.inner_text("#live-mode")
        page.wait_for_selector("#ledger-rows tr[data-type=credit_deduction]")
        screenshot(page, "02-edit-completed")

    def test_an_analysis_shows_a_readable_table_palette_and_face_boxes(self, console, tmp_path):
        page = console()
        choose(page, "image_analysis", png(tmp_path, "face.png", face_scene()))
        page.wait_for_selector("#estimate [data-cost='1']")
        submit_and_wait(page, "image_analysis")
        page.wait_for_selector("#output .analysis")
        boxes = page.locator("#output .face-box")
        boxes.first.wait_for()
        assert boxes.count() == 1, explain(page)
        assert page.locator("#output .swatch").count() >= 3
        assert "1 face found" in page.inner_text("#output figcaption")
        # The box sits on the face: 250..430 x 80..260 of a 480x360 image.
        image = page.locator("#output .frame img").bounding_box()
        box = boxes.first.bounding_box()
        centre = ((box["x"] - image["x"] + box["width"] / 2) / image["width"],
                  (box["y"] - image["y"] + box["height"] / 2) / image["height"])
        assert abs(centre[0] - 340 / 480) < 0.08 and abs(centre[1] - 170 / 360) < 0.1, centre
        screenshot(page, "03-analysis-with-face-boxes")

    def test_a_short_video_is_made_and_plays(self, console, tmp_path):
        page = console()
        frames = [png(tmp_path, f"v{i}.png", Image.open(io.BytesIO(image_bytes("PNG", (160, 120), colour))))
                  for i, colour in enumerate([(220, 60, 40), (40, 160, 90)])]
        choose(page, "video_generation", *frames)
        page.fill('[name="params.duration"]', "1")
        page.fill('[name="params.fps"]', "10")
        page.fill('[name="params.width"]', "160")
        page.fill('[name="params.height"]', "120")
        page.wait_for_selector("#estimate [data-cost='4']")
        submit_and_wait(page, "video_generation")
        video = page.wait_for_selector("#output video")
        page.wait_for_function("v => v.readyState >= 2 && !v.paused && v.currentTime > 0", arg=video, timeout=20_000)
        assert page.evaluate("v => v.videoWidth", video) == 160, explain(page)
        screenshot(page, "04-video-playing")

    def test_cancelling_a_running_task_shows_the_refund_in_the_ledger(self, console, tmp_path):
        page = console()
        choose(page, "video_generation", png(tmp_path, "long.png", Image.open(io.BytesIO(
            image_bytes("PNG", (640, 360), (90, 90, 200))))))
        page.fill('[name="params.duration"]', "120")  # long enough to be cancelled while it runs
        page.fill('[name="params.width"]', "1920")
        page.fill('[name="params.height"]', "1080")
        page.wait_for_selector("#estimate [data-cost='240']")
        row = submit_and_wait(page, "video_generation", status="processing")
        page.wait_for_selector("#ledger-rows tr[data-type=credit_deduction]")  # charged as it started
        row.locator("button.cancel").click()
        page.wait_for_selector("tr.task[data-type=video_generation][data-status=cancelled]")
        refund = page.wait_for_selector("#ledger-rows tr[data-type=credit_refund]")
        assert "+240" in refund.inner_text(), explain(page)
        assert page.inner_text("#credits [data-bucket=reserved] .amount") == "0"
        screenshot(page, "05-cancelled-and-refunded")

    def test_a_402_says_what_is_missing(self, console, e2e_db, make_token, tmp_path):
        page = console(member_with(e2e_db, make_token, plan="pro", plan_credits=1))
        choose(page, "advanced_editing", png(tmp_path, "in.png", Image.open(io.BytesIO(image_bytes("PNG", (32, 32))))))
        page.wait_for_selector("#estimate [data-cost='2']")
        assert "would be refused" in page.inner_text("#estimate")
        page.click("#submit-task")
        error = page.wait_for_selector("#task-error .error[data-status='402']")
        text = error.inner_text()
        assert "Not enough credits" in text and "This task costs 2 credits; you have 1 available" in text
        assert page.locator("tr.task").count() == 0
        screenshot(page, "06-insufficient-credits-402")

    def test_a_400_names_the_field_and_marks_it(self, console, tmp_path):
        page = console()
        choose(page, "advanced_editing", png(tmp_path, "in.png", Image.open(io.BytesIO(image_bytes("PNG", (32, 32))))))
        page.select_option('select[name="params.operations-add"]', "rotate")
        page.fill('[name="params.operations[0].degrees"]', "999")
        page.click("#submit-task")
        error = page.wait_for_selector("#task-error .error[data-status='400']")
        assert "params.operations[0].degrees" in error.inner_text()
        page.wait_for_selector('.field.invalid[data-path="params.operations[0].degrees"]')
        screenshot(page, "07-invalid-params-400")

    def test_a_429_says_when_to_retry(self, browser, media_worker, console_settings, e2e_db, make_token,
                                      tmp_path_factory, tmp_path):
        # Its own gunicorn, with a per-user limit a few requests past what the page loads.
        log = tmp_path_factory.mktemp("console-logs") / "limited.log"
        limited = Gunicorn(worker_env(console_settings, RATE_LIMIT_FREE="12"), log_path=log).start()
        try:
            member = member_with(e2e_db, make_token, plan="free")
            page = browser.page()
            page.goto(f"http://127.0.0.1:{limited.port}/#token={member.token}")
            page.wait_for_selector("body[data-ready=true]")
            choose(page, "image_analysis", png(tmp_path, "in.png", Image.open(io.BytesIO(image_bytes("PNG", (32, 32))))))
            for _ in range(12):
                page.click("#submit-task")
                page.wait_for_function("() => !document.getElementById('submit-task').disabled")
                if page.locator("#task-error .error[data-code=rate_limited]").count():
                    break
            error = page.wait_for_selector("#task-error .error[data-code=rate_limited]")
            text = error.inner_text()
            assert "12 per 60 s" in text and re.search(r"You can retry in \d+ s", text), text
            screenshot(page, "10-rate-limited-429")
        finally:
            browser.close_pages()
            limited.stop()

    def test_sign_in_with_a_token_billing_not_configured_and_webhooks(self, browser, api_server, media_worker,
                                                                      e2e_db, make_token):
        member = member_with(e2e_db, make_token, plan="free")
        page = browser.page()
        try:
            page.goto(f"{api_server.url}/")
            page.wait_for_selector("#signin:not([hidden])")
            screenshot(page, "08-sign-in")
            page.fill("#token-input", member.token)
            page.click("#signin-form button[type=submit]")
            page.wait_for_selector("body[data-ready=true]")
            assert page.evaluate("sessionStorage.getItem('studiox.token')") == member.token
            assert page.evaluate("localStorage.length") == 0
            assert page.inner_text("#account-facts [data-fact=plan]") == "free"

            # No Stripe key here: buying says billing is not configured instead of failing.
            page.click("#packs .card button.buy >> nth=0")
            notice = page.wait_for_selector("#billing-status .notice[data-code=billing_not_configured]")
            assert "not configured" in notice.inner_text()
            assert page.locator("#packs button.buy:disabled").count() >= 1

            # Webhooks: the panel shows because /openapi.json lists them.
            page.fill("#webhook-url", "https://hooks.example.com/studiox")
            page.click("#webhook-form button[type=submit]")
            secret = page.wait_for_selector("#webhook-secret code")
            assert secret.inner_text().startswith("whsec_")
            page.click("#webhook-rows tr[data-webhook] button:text('Deliveries')")
            page.wait_for_selector("#deliveries table")
            screenshot(page, "09-billing-not-configured-and-webhooks")

            page.click("#sign-out")
            page.wait_for_selector("#signin:not([hidden])")
            assert page.evaluate("sessionStorage.getItem('studiox.token')") is None
        finally:
            browser.close_pages()
