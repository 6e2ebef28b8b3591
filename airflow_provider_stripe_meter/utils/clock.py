"""The wall clock the batch operator plans with, in one place.

Plain Python. Billing decisions depend on "now" (is a day still inside Stripe's identifier
window, has Stripe's summary had time to settle, which rows are older than 35 days), so the
operator reads it here and nowhere else; a test that moves time moves this function (and the
local server's clock) together.
"""

from __future__ import annotations

import time


def now() -> float:
    """Unix seconds, now."""
    return time.time()
