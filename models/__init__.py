"""StudioX's data and the rules about money. Imports neither `api` nor `worker`."""

from .base import Base, utcnow
from .billing import PlanChange
from .credits import Transaction
from .events import Event
from .plans import Plan
from .purchases import CreditPack, Purchase
from .stripe_events import StripeEvent, SyncCursor
from .subscriptions import Subscription
from .tasks import AiTask
from .uploads import Upload
from .users import User
from .webhooks import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookFanout, WebhookSigningSecret

__all__ = ["AiTask", "Base", "CreditPack", "Event", "Plan", "PlanChange", "Purchase", "StripeEvent", "Subscription", "SyncCursor",
           "Transaction", "Upload", "User", "WebhookAttempt", "WebhookDelivery", "WebhookEndpoint", "WebhookFanout",
           "WebhookSigningSecret", "utcnow"]
