"""The worker: fetching, executing, completing, renewing leases and scheduling on one event loop."""

from aqueue._worker._immediate import run_immediately
from aqueue._worker._runner import Worker

__all__ = ["Worker", "run_immediately"]
