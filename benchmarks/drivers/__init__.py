"""One driver per library; each runs inside that library's own virtualenv (see benchmarks/peers.py)."""
