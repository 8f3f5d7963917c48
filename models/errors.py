"""Domain errors: each states a fact and carries its HTTP status and machine code.

The API renders every one of them through one handler; operations never raise falcon
errors, and the worker reads `code` to record why a task failed.
"""

from __future__ import annotations

from typing import Any

from tasktypes.validation import validation_failures


class DomainError(Exception):
    status_code = 400
    code = "bad_request"
    # A machine-readable list of what failed ({"path", "message", "type"}), for errors that
    # have several parts; rendered under the error body's `details` key.
    details: list[dict[str, Any]] | None = None

    def __init__(self, message: str | None = None, *, code: str | None = None,
                 details: list[dict[str, Any]] | None = None):
        super().__init__(message or self.__doc__ or self.code)
        self.message = message or (self.__doc__ or self.code).strip()
        if code:
            self.code = code
        if details is not None:
            self.details = details


class InvalidInput(DomainError):
    """The request is not valid."""

    status_code = 400
    code = "invalid_input"

    @classmethod
    def from_validation(cls, exc, data: Any = None, *, prefix: str = "", code: str = "invalid_input") -> InvalidInput:
        """A 400 whose message names the first failing field by its path, with every failure in `details`."""
        failures = validation_failures(exc, data, prefix)
        first = failures[0]
        message = f"{first['path']}: {first['message']}" if first["path"] else first["message"]
        if len(failures) > 1:
            message += f" (and {len(failures) - 1} more in details)"
        return cls(message, code=code, details=failures)


class UserNotFound(DomainError):
    """The user has not been initialized; call POST /api/users/initialize first."""

    status_code = 404
    code = "user_not_found"


class TaskNotFound(DomainError):
    """Task not found."""

    status_code = 404
    code = "task_not_found"


class UploadNotFound(DomainError):
    """Upload not found."""

    status_code = 404
    code = "upload_not_found"


class OutputNotReady(DomainError):
    """The task has no output yet."""

    status_code = 404
    code = "output_not_ready"


class PlanNotFound(DomainError):
    """Unknown plan."""

    status_code = 400
    code = "unknown_plan"


class InsufficientCredits(DomainError):
    """Not enough credits."""

    status_code = 402
    code = "insufficient_credits"


class PlanDoesNotAllow(DomainError):
    """Your plan does not allow this task type."""

    status_code = 403
    code = "plan_does_not_allow"


class TooManyTasksInFlight(DomainError):
    """Too many tasks in flight for your plan; wait for one to finish."""

    status_code = 429
    code = "too_many_tasks_in_flight"


class IdempotencyKeyReused(DomainError):
    """This Idempotency-Key was already used with a different request body."""

    status_code = 409
    code = "idempotency_key_reused"


class TaskAlreadyFinal(DomainError):
    """The task has already finished."""

    status_code = 409
    code = "task_already_final"


class InvalidTransition(DomainError):
    """That status change is not allowed."""

    status_code = 409
    code = "invalid_transition"


class BillingNotConfigured(DomainError):
    """Billing is not configured on this server."""

    status_code = 503
    code = "billing_not_configured"


class PackNotFound(DomainError):
    """Unknown credit pack."""

    status_code = 400
    code = "unknown_pack"


class PurchaseNotFound(DomainError):
    """Purchase not found."""

    status_code = 404
    code = "purchase_not_found"


class PlanNotPurchasable(DomainError):
    """That plan cannot be bought on this server."""

    status_code = 400
    code = "plan_not_purchasable"


class NoSubscription(DomainError):
    """You have no subscription to change."""

    status_code = 409
    code = "no_subscription"


class NoBillingAccount(DomainError):
    """You have no billing account yet; buy credits or a plan first."""

    status_code = 409
    code = "no_billing_account"


class BillingProviderError(DomainError):
    """Stripe could not be reached or refused the request; try again."""

    status_code = 502
    code = "billing_provider_error"
