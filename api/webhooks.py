"""/api/webhooks: a user's webhook endpoints, their delivery logs, the signing secret of the
per-task webhooks, and the low-balance threshold behind `credits.low`.

Another user's endpoint (or task) is a 404 like a missing one (invariant 6). The secret of
an endpoint is answered once, by its registration.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar, Literal

import falcon
from pydantic import Field
from typing_extensions import Annotated

from models.events import EVENT_TYPES, TASK_EVENT_TYPES
from models.errors import TaskNotFound
from models.admission import UrlPolicy
from models.tasks import get_task_of
from models.webhooks import (
    MAX_ENDPOINTS_PER_USER,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookNotFound,
    create_endpoint,
    delete_endpoint,
    get_endpoint_of,
    list_deliveries,
    list_endpoints,
    low_credits_threshold,
    set_low_credits_threshold,
    signing_secret_of,
)

from .context import current_user, parse_uuid
from .openapi import operation
from .schemas import PageQuery, RequestSchema, Schema
from .serialize import media

EventName = Literal[EVENT_TYPES]  # type: ignore[valid-type]
TaskEventName = Literal[TASK_EVENT_TYPES]  # type: ignore[valid-type]
WEBHOOK_URL = Field(min_length=1, max_length=2048, pattern=r"^[hH][tT][tT][pP][sS]?://[^\s]+$",
                    description="http(s); not a private, loopback or metadata address (unless the operator allows "
                                "it); names are resolved and checked again at every delivery")


# --- shapes ----------------------------------------------------------------------------------------

class CreateWebhookBody(RequestSchema):
    url: str = WEBHOOK_URL
    events: Annotated[list[EventName], Field(min_length=1, max_length=len(EVENT_TYPES))] | None = Field(
        None, description="The event types to send; default: all of them")
    error_codes: ClassVar[dict[str, str]] = {"url": "invalid_webhook_url", "events": "invalid_webhook_events"}


class WebhookOut(Schema):
    id: uuid.UUID
    url: str
    events: list[str]
    status: Literal["enabled", "disabled", "deleted"]
    disabled_reason: str | None = Field(description="Why StudioX stopped sending to it")
    disabled_at: datetime | None
    failing_since: datetime | None = Field(
        description="Every attempt has failed since then (null while deliveries succeed); a day of it disables "
                    "the endpoint")
    created_at: datetime


class WebhookEnvelope(Schema):
    webhook: WebhookOut


class CreatedWebhook(Schema):
    webhook: WebhookOut
    secret: str = Field(description="whsec_…: verify each delivery's webhook-signature with it. Shown only here, once")


class WebhookList(Schema):
    webhooks: list[WebhookOut]


class AttemptOut(Schema):
    at: datetime
    status_code: int | None = Field(description="What the endpoint answered; null when it did not (see error)")
    error: str | None = Field(description="Why the attempt failed (timeout, url_not_allowed, HTTP 500, …)")
    latency_ms: int


class DeliveryOut(Schema):
    id: str = Field(description="Also the cursor that pages after it")
    webhook_id: str = Field(description="The webhook-id header: the same on every attempt of this delivery")
    event_id: str
    event_type: str
    url: str
    status: Literal["pending", "delivered", "failed", "cancelled"] = Field(
        description="pending (another attempt is due at nextAttemptAt), delivered (a 2xx), failed (every attempt "
                    "failed), cancelled (the endpoint was disabled or deleted)")
    attempt_count: int
    attempts: list[AttemptOut] = Field(description="Oldest first")
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


class DeliveryPage(Schema):
    deliveries: list[DeliveryOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end")


class TaskDeliveryPage(DeliveryPage):
    task_id: uuid.UUID
    webhook: str | None = Field(description="The task's own webhook URL, if it has one")
    webhook_events: list[str] | None


class DeliveryQuery(PageQuery):
    cursor: str | None = Field(None, pattern=r"^[0-9]{1,18}$", description="nextCursor of the previous page")


class SigningSecretOut(Schema):
    secret: str = Field(description="whsec_…: signs the deliveries of your tasks' own webhooks (the webhook field "
                                    "of POST /api/tasks/create); made on first use, then stable")


class WebhookSettingsBody(RequestSchema):
    low_credits_threshold: Annotated[int, Field(ge=0, le=1_000_000_000)] | None = Field(
        description="credits.low is sent when your balance falls below it; 0: never; null: your plan's default")
    error_codes: ClassVar[dict[str, str]] = {"lowCreditsThreshold": "invalid_threshold",
                                             "low_credits_threshold": "invalid_threshold"}


class WebhookSettingsOut(Schema):
    low_credits_threshold: int = Field(description="In force: your own, or your plan's")
    plan_default: int
    override: int | None = Field(description="Your own threshold; null: the plan's applies")


# --- views ----------------------------------------------------------------------------------------

def webhook_out(endpoint: WebhookEndpoint) -> WebhookOut:
    return WebhookOut(id=endpoint.id, url=endpoint.url, events=list(endpoint.events), status=endpoint.status,
                      disabled_reason=endpoint.disabled_reason, disabled_at=endpoint.disabled_at,
                      failing_since=endpoint.failing_since, created_at=endpoint.created_at)


def delivery_out(delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryOut:
    return DeliveryOut(
        id=str(delivery.id), webhook_id=delivery.webhook_id, event_id=str(delivery.event_id),
        event_type=delivery.event_type, url=delivery.url, status=delivery.status,
        attempt_count=delivery.attempts, next_attempt_at=delivery.next_attempt_at,
        delivered_at=delivery.delivered_at, created_at=delivery.created_at,
        attempts=[AttemptOut(at=a.attempted_at, status_code=a.status_code, error=a.error, latency_ms=a.latency_ms)
                  for a in attempts])


def _deliveries(session, query: DeliveryQuery, **target) -> tuple[list[DeliveryOut], str | None]:
    page, attempts, next_id = list_deliveries(session, cursor=int(query.cursor) if query.cursor else None,
                                              limit=query.limit, **target)
    return [delivery_out(d, attempts[d.id]) for d in page], str(next_id) if next_id is not None else None


_WEBHOOK_ID = {"webhook_id": "$response.body#/webhook/id"}
WEBHOOK_LINKS = {
    "ListDeliveries": {"operationId": "get_api_webhooks_webhook_id_deliveries", "parameters": _WEBHOOK_ID},
    "DeleteWebhook": {"operationId": "delete_api_webhooks_webhook_id", "parameters": _WEBHOOK_ID},
}


# --- resources ------------------------------------------------------------------------------------

class WebhooksResource:
    def __init__(self, url_policy: UrlPolicy = UrlPolicy()):
        self.url_policy = url_policy

    @operation("Register a webhook endpoint", body=CreateWebhookBody, responses={201: CreatedWebhook},
               links={201: WEBHOOK_LINKS}, errors=(404, 409),
               description="StudioX POSTs each chosen event to the URL, signed per Standard Webhooks "
                           "(webhook-id, webhook-timestamp, webhook-signature with the secret answered here, once), "
                           "retrying with backoff for about a day. A literal private, loopback or metadata address "
                           f"is a 400 url_not_allowed. At most {MAX_ENDPOINTS_PER_USER} endpoints (409).")
    def on_post(self, req: falcon.Request, resp: falcon.Response, body: CreateWebhookBody) -> None:
        endpoint = create_endpoint(req.context.session, current_user(req), body.url, body.events,
                                   url_policy=self.url_policy)
        resp.status = falcon.HTTP_201
        resp.media = media(CreatedWebhook(webhook=webhook_out(endpoint), secret=endpoint.secret))

    @operation("List your webhook endpoints, with their status", responses={200: WebhookList}, errors=(404,))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        endpoints = list_endpoints(req.context.session, current_user(req))
        resp.media = media(WebhookList(webhooks=[webhook_out(e) for e in endpoints]))


class WebhookResource:
    @operation("Delete a webhook endpoint: nothing more is sent to it", responses={200: WebhookEnvelope},
               errors=(404,))
    def on_delete(self, req: falcon.Request, resp: falcon.Response, webhook_id: str) -> None:
        endpoint = delete_endpoint(req.context.session, current_user(req),
                                   parse_uuid(webhook_id, not_found=WebhookNotFound))
        resp.media = media(WebhookEnvelope(webhook=webhook_out(endpoint)))


class WebhookDeliveriesResource:
    @operation("The delivery log of an endpoint, newest first", query=DeliveryQuery,
               responses={200: DeliveryPage}, errors=(404,))
    def on_get(self, req: falcon.Request, resp: falcon.Response, webhook_id: str, query: DeliveryQuery) -> None:
        session = req.context.session
        endpoint = get_endpoint_of(session, current_user(req), parse_uuid(webhook_id, not_found=WebhookNotFound))
        deliveries, next_cursor = _deliveries(session, query, endpoint_id=endpoint.id)
        resp.media = media(DeliveryPage(deliveries=deliveries, next_cursor=next_cursor))


class TaskWebhookDeliveriesResource:
    @operation("The delivery log of a task's own webhook, newest first", query=DeliveryQuery,
               responses={200: TaskDeliveryPage}, errors=(404,), tags=("tasks",))
    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str, query: DeliveryQuery) -> None:
        session = req.context.session
        task = get_task_of(session, req.context.identity.clerk_id, parse_uuid(task_id, not_found=TaskNotFound))
        deliveries, next_cursor = _deliveries(session, query, task_id=task.id)
        resp.media = media(TaskDeliveryPage(task_id=task.id, webhook=task.webhook_url,
                                            webhook_events=task.webhook_events, deliveries=deliveries,
                                            next_cursor=next_cursor))


class SigningSecretResource:
    @operation("Your signing secret for your tasks' own webhooks", responses={200: SigningSecretOut}, errors=(404,))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = media(SigningSecretOut(secret=signing_secret_of(req.context.session, current_user(req).id)))


class WebhookSettingsResource:
    @operation("Your low-balance threshold (credits.low)", responses={200: WebhookSettingsOut}, errors=(404,))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = _settings_out(low_credits_threshold(req.context.session, current_user(req)))

    @operation("Set your low-balance threshold (credits.low)", body=WebhookSettingsBody,
               responses={200: WebhookSettingsOut}, errors=(404,),
               description="credits.low is sent once each time your balance falls below the threshold, and again "
                           "only after it is back at or above it.")
    def on_put(self, req: falcon.Request, resp: falcon.Response, body: WebhookSettingsBody) -> None:
        found = set_low_credits_threshold(req.context.session, current_user(req), body.low_credits_threshold)
        resp.media = _settings_out(found)


def _settings_out(found: tuple[int, int, int | None]) -> dict:
    effective, plan_default, override = found
    return media(WebhookSettingsOut(low_credits_threshold=effective, plan_default=plan_default, override=override))
