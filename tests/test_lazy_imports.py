"""What a worker may never need loads on first use (aqueue/__init__.py): importing aqueue and its
worker leaves those modules out, and each name still resolves, once asked for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aqueue

ROOT = Path(__file__).resolve().parent.parent
ON_FIRST_USE = ("aqueue._workflows", "aqueue._periodic", "aqueue._locks", "aqueue._ratelimit",
                "aqueue._decorating")


def fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter: nothing this test process imported counts."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_worker_does_not_import_what_it_may_never_need() -> None:
    code = ("import sys, aqueue, aqueue._cli, aqueue._worker._runner; "
            f"print(sorted(m for m in {ON_FIRST_USE!r} if m in sys.modules))")
    assert fresh_python(code).strip() == "[]"


def test_names_loaded_on_first_use_resolve_to_their_modules() -> None:
    from aqueue._locks import Lock
    from aqueue._periodic import crontab
    from aqueue._ratelimit import RateLimit
    from aqueue._workflows import group

    assert aqueue.Lock is Lock
    assert aqueue.RateLimit is RateLimit
    assert aqueue.crontab is crontab
    assert aqueue.group is group
    assert {"Lock", "RateLimit", "crontab", "group"} <= set(dir(aqueue))


def test_lock_and_rate_limit_are_made_without_importing_them_first() -> None:
    code = ("import aqueue; q = aqueue.Queue('memory://'); "
            "print(type(q.lock('x')).__name__, type(q.rate_limit('k', limit=1, per=1.0)).__name__)")
    assert fresh_python(code).split() == ["Lock", "RateLimit"]
