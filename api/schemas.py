"""The HTTP contract's shapes: every request body, query and response body, declared once.

Resources receive validated request objects (see `api/openapi.py`'s `operation`) and
answer with these response models; `/openapi.json` is generated from the same classes.
JSON keys are camelCase; request models accept the snake_case spelling too.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SkipValidation, WithJsonSchema, field_validator
from pydantic.alias_generators import to_camel
from typing_extensions import Annotated

from models.base import storable_text
from models.events import TASK_EVENT_TYPES
from models.tasks import STATUSES
from tasktypes import TASK_TYPE_SPECS, TASK_TYPES
from tasktypes.inputs import TaskInput
from tasktypes.params import AnalysisParams, EditParams, VideoParams

TaskTypeName = Annotated[str, WithJsonSchema({"type": "string", "enum": list(TASK_TYPES)})]
TaskStatus = Literal[STATUSES]  # type: ignore[valid-type]
TaskEventName = Literal[TASK_EVENT_TYPES]  # type: ignore[valid-type]


class Schema(BaseModel):
    """camelCase on the wire, snake_case accepted on the way in."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class RequestSchema(Schema):
    model_config = ConfigDict(extra="ignore")
    # The machine code of a refusal, by the first failing field (default: invalid_input).
    error_codes: ClassVar[dict[str, str]] = {}


# --- errors ------------------------------------------------------------------------------

class ErrorDetail(Schema):
    path: str = Field(description="The failing field, as the client spells it: `params.operations[2].degrees`")
    message: str
    type: str = Field(description="pydantic's error type (`less_than_equal`, `missing`, ...)")


class ErrorBody(BaseModel):
    """Every error, whatever its status."""

    error: str = Field(description="What went wrong, for a person; a validation error names the field by its path")
    statusCode: int
    code: str = Field(description="Machine-readable (`insufficient_credits`, `invalid_params`, ...)")
    details: list[ErrorDetail] | None = Field(
        None, description="Validation errors only: every failing field, not just the first")


# --- users and credits -------------------------------------------------------------------

class UserOut(Schema):
    id: uuid.UUID
    clerk_id: str
    email: str | None
    name: str | None
    plan_id: str
    credits: int = Field(description="plan_credits + purchased_credits")
    plan_credits: int = Field(description="Granted monthly by the plan; expire at the next reset")
    purchased_credits: int = Field(description="Bought; never expire")
    credit_reset_at: datetime | None
    stripe_customer_id: str | None
    created_at: datetime


class UserEnvelope(Schema):
    user: UserOut


class InitializedUser(Schema):
    user: UserOut
    created: bool = Field(description="False when the user already existed (the call is idempotent)")


class InitializeBody(RequestSchema):
    email: Annotated[str, Field(max_length=255)] | None = Field(None, description="Defaults to the token's claim")
    name: Annotated[str, Field(max_length=255)] | None = Field(None, description="Defaults to the token's claim")

    @field_validator("email", "name")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        # Claims reach here unchecked by the JSON body's rules (a token can carry anything).
        if value is not None and not storable_text(value):
            raise ValueError("must not hold NUL or invalid Unicode characters")
        return value


class CreditsOut(Schema):
    credits: int
    plan_credits: int
    purchased_credits: int
    reserved: int = Field(description="Promised to pending tasks (charged when a worker starts them)")
    available: int = Field(description="credits - reserved: what a new task may use")
    next_reset_at: datetime | None
    credit_reset_at: datetime | None = Field(description="Same as nextResetAt (the seed's name)")


class TransactionOut(Schema):
    id: Annotated[str, BeforeValidator(str)] = Field(description="Also the cursor that pages after it")
    amount: int
    bucket: Literal["plan", "purchased", "both"]
    plan_delta: int
    purchased_delta: int
    balance_after: int
    type: str
    task_id: uuid.UUID | None
    description: str | None
    created_at: datetime


class TransactionPage(Schema):
    transactions: list[TransactionOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end")


class PageQuery(RequestSchema):
    limit: int = Field(20, ge=1, le=100, description="Page size")
    error_codes: ClassVar[dict[str, str]] = {"limit": "invalid_limit", "cursor": "invalid_cursor"}


class TransactionQuery(PageQuery):
    cursor: str | None = Field(None, pattern=r"^[0-9]{1,19}$", description="nextCursor of the previous page")

    @field_validator("cursor")
    @classmethod
    def _within_bigint(cls, value: str | None) -> str | None:
        # The ledger id is a BIGINT: past it, the query itself would fail.
        if value is not None and int(value) > 2**63 - 1:
            raise ValueError("is not a cursor of this list")
        return value


# --- plans ---------------------------------------------------------------------------------

class PlanOut(Schema):
    id: str
    name: str
    monthly_credits: int
    price: float = Field(description="Per month, in the currency's main unit")
    price_cents: int
    currency: str
    allowed_task_types: list[str]
    max_concurrent_tasks: int
    purchasable: bool = Field(False, description="Can be subscribed to through Stripe here (it has a Stripe price)")


class PackOut(Schema):
    id: str
    name: str
    credits: int
    price: float = Field(description="In the currency's main unit")
    price_cents: int
    currency: str


class TaskCost(Schema):
    model_config = ConfigDict(extra="allow")
    base: int
    unit: str
    description: str


class PlansOut(Schema):
    plans: list[PlanOut]
    packs: list[PackOut] = Field(description="Credit packs: bought once, never expire")
    task_costs: dict[str, TaskCost]


# --- billing -------------------------------------------------------------------------------

class PurchaseCreditsBody(RequestSchema):
    pack: str = Field(min_length=1, max_length=32, description="A pack id from GET /api/billing/plans")
    error_codes: ClassVar[dict[str, str]] = {"pack": "invalid_pack"}


class CheckoutOut(Schema):
    url: str = Field(description="Stripe Checkout: send the customer there")
    session_id: str


class PurchaseOut(Schema):
    id: uuid.UUID
    session_id: str
    pack_id: str
    credits: int = Field(description="What the purchase granted (or will, once paid)")
    status: Literal["pending", "paid", "failed", "expired"]
    amount_paid: int | None = Field(description="In the currency's smallest unit")
    currency: str | None
    amount_refunded: int
    credits_taken_back: int = Field(description="Taken back by refunds and a dispute (net of a reinstatement)")
    shortfall: int = Field(description="What refunds or a dispute claimed but had already been spent")
    dispute_state: Literal["open", "reinstated", "lost"] | None
    created_at: datetime
    paid_at: datetime | None


class SyncOut(Schema):
    purchase: PurchaseOut
    outcome: str = Field(description="credits_granted, already_fulfilled, awaiting_payment, ...")
    credits: int = Field(description="Your balance afterwards")


class UpgradePlanBody(RequestSchema):
    plan_id: str = Field(min_length=1, max_length=32, description="free, pro or enterprise")
    error_codes: ClassVar[dict[str, str]] = {"planId": "invalid_plan", "plan_id": "invalid_plan"}


class UpgradeOut(Schema):
    action: Literal["checkout", "subscription_updated", "cancel_at_period_end", "unchanged"]
    plan_id: str
    effective: Literal["after_payment", "now", "period_end", "unchanged"] = Field(
        description="When the plan changes; it changes only when Stripe's events say so")
    message: str
    url: str | None = Field(None, description="Checkout URL (action=checkout)")
    session_id: str | None = None


class PlanChangeOut(Schema):
    from_plan_id: str
    to_plan_id: str
    reason: str
    subscription_id: str | None
    created_at: datetime


class PeriodOut(Schema):
    invoice_id: str | None
    credits: int
    period: date | None = Field(description="The period's first day")
    description: str | None
    created_at: datetime


class HistoryEntryOut(Schema):
    kind: Literal["purchase", "plan_change", "subscription_period"]
    at: datetime
    purchase: PurchaseOut | None = None
    plan_change: PlanChangeOut | None = None
    period: PeriodOut | None = None


class HistoryPage(Schema):
    entries: list[HistoryEntryOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end")


class HistoryQuery(PageQuery):
    cursor: str | None = Field(None, max_length=200, description="nextCursor of the previous page")


class NextDateOut(Schema):
    plan_id: str
    kind: Literal["renewal", "reset"] = Field(description="renewal: a paid plan Stripe renews; reset: beat's monthly reset")
    next_date: datetime | None
    subscription_status: str | None
    cancel_at_period_end: bool


class PortalOut(Schema):
    url: str


class StripeEventEnvelope(BaseModel):
    """What the webhook reads of a verified body before storing it (the rest is kept as sent)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=255)
    type: str = Field(min_length=1, max_length=128)
    created: int | None = Field(None, ge=0, le=2**33)
    livemode: bool = False
    data: dict[str, Any]


class WebhookAck(Schema):
    received: bool
    duplicate: bool = Field(description="This event id was stored before (a redelivery)")


# --- tasks ---------------------------------------------------------------------------------

class CreateTaskBody(RequestSchema):
    # The schema documents input and params; `submit_task` validates them against the type
    # (a params object is read by the schema of its task type), so they arrive here as sent.
    type: TaskTypeName
    input: SkipValidation[TaskInput]
    params: SkipValidation[AnalysisParams | EditParams | VideoParams | None] = Field(
        None, description="Options of the task type: " + ", ".join(
            f"{name}: {spec.params.__name__}" for name, spec in TASK_TYPE_SPECS.items()))
    start_by: datetime | Annotated[float, Field(gt=0, le=30 * 86400)] | None = Field(
        None, description="A deadline: if no worker has started the task by then it ends `expired`, never "
                          "charged. An absolute time, or seconds from now (at most 30 days). Default: the "
                          "plan's (free 1 h, pro 6 h, enterprise 24 h)")
    # The task's own webhook (no endpoint to register): deliveries signed with your signing
    # secret (GET /api/webhooks/signing-secret); log at GET /api/tasks/{id}/webhook-deliveries.
    webhook: str | None = Field(
        None, min_length=1, max_length=2048, pattern=r"^[hH][tT][tT][pP][sS]?://[^\s]+$",
        description="An http(s) URL StudioX POSTs this task's events to, signed per Standard Webhooks with your "
                    "signing secret; not a private, loopback or metadata address")
    webhook_events: Annotated[list[TaskEventName], Field(min_length=1)] | None = Field(
        None, description="The events sent to `webhook`; default: how the task ends (task.completed, task.failed, "
                          "task.cancelled, task.expired)")
    error_codes: ClassVar[dict[str, str]] = {"type": "invalid_task_type", "params": "invalid_params",
                                             "startBy": "invalid_start_by", "webhook": "invalid_webhook_url",
                                             "webhookEvents": "invalid_webhook_events"}


class EstimateOut(Schema):
    cost: int = Field(description="Credits the task would cost")
    available: int = Field(description="Your credits less what your pending tasks reserve")
    affordable: bool = Field(description="available covers the cost now")
    plan_allows: bool = Field(description="Your plan includes this task type")
    in_flight: int = Field(description="Your pending and processing tasks")
    max_in_flight: int = Field(description="Your plan's limit of tasks in flight")
    has_room: bool = Field(description="in_flight is under the limit")
    would_be_accepted: bool = Field(description="Submitting now would be accepted (201)")


class TaskOut(Schema):
    id: uuid.UUID
    user_id: uuid.UUID
    type: str
    status: TaskStatus
    input: Any = Field(description="As submitted")
    params: dict[str, Any] = Field(description="As submitted")
    output: dict[str, Any] | None = Field(description="What the processor returned, once completed")
    credits_used: int = Field(description="The price, fixed at submission")
    progress: int = Field(ge=0, le=100)
    error: str | None
    error_code: str | None
    queue: str
    attempt: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    output_url: str | None = Field(description="GET it (with the same token) for the output file; null "
                                               "until there is one, and again once it expired")
    output_size: int | None
    output_type: str | None
    output_expired_at: datetime | None = Field(
        description="When retention deleted the output file (GET .../output is then 410 output_expired)")
    start_by: datetime | None = Field(description="Deadline to start; past it a pending task ends expired")
    queue_position: int | None = Field(
        description="While pending: 1 + the pending tasks ahead of it in its queue, oldest first")
    queue_time: float | None = Field(description="Seconds from submission to start (so far, while pending)")
    run_time: float | None = Field(description="Seconds from start to end (so far, while processing)")
    retry_of: uuid.UUID | None = Field(description="The task this one retries")
    retries: list[uuid.UUID] = Field(default_factory=list, description="Retries made of this task, oldest first")


class TaskEnvelope(Schema):
    task: TaskOut


class TaskPage(Schema):
    tasks: list[TaskOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end")


class TaskListQuery(PageQuery):
    status: TaskStatus | None = None
    type: TaskTypeName | None = None
    cursor: str | None = Field(None, max_length=200, description="nextCursor of the previous page")
    error_codes: ClassVar[dict[str, str]] = {**PageQuery.error_codes, "status": "invalid_status",
                                             "type": "invalid_task_type"}


class TaskStats(Schema):
    total: int
    by_status: dict[str, int]
    by_type: dict[str, int]
    credits_spent: int
    credits_refunded: int
    net_credits_spent: int


class TaskStatusBody(RequestSchema):
    # Other statuses are a 409 invalid_transition from the rule itself, not a schema refusal.
    status: Annotated[str, WithJsonSchema({"type": "string", "enum": ["failed", "pending"]})] = Field(
        description="failed refunds a charged task; pending re-sends a pending task's message")
    error: Annotated[str, Field(max_length=2000)] | None = Field(None, description="Shown on a failed task")
    error_codes: ClassVar[dict[str, str]] = {"status": "invalid_status"}


# --- uploads -------------------------------------------------------------------------------

class UploadOut(Schema):
    id: uuid.UUID
    content_type: str
    size: int
    width: int | None
    height: int | None
    filename: str | None
    sha256: str
    created_at: datetime
    expired_at: datetime | None = Field(
        description="When retention deleted the file; an expired upload is no longer a task input "
                    "(404 upload_expired)")


class UploadEnvelope(Schema):
    upload: UploadOut


class UploadForm(BaseModel):
    file: Annotated[bytes, WithJsonSchema({"type": "string", "format": "binary"})]


# --- health --------------------------------------------------------------------------------

class HealthOut(Schema):
    status: Literal["ok"]
    checks: dict[str, Literal["ok"]]
