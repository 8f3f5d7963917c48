"""StudioX's data and the rules about money. Imports neither `api` nor `worker`."""

from .base import Base, utcnow
from .billing import StripeEvent
from .credits import Transaction
from .plans import Plan
from .tasks import AiTask
from .uploads import Upload
from .users import User

__all__ = ["AiTask", "Base", "Plan", "StripeEvent", "Transaction", "Upload", "User", "utcnow"]
