"""`studiox`, the operator's console script: users, credits, plans, tasks, resets, Stripe
replay and reconciliation, and the audit of every invariant."""
