"""The baseline of the service benchmarks: a bare FastAPI endpoint returning 25 ints, served
by the same uvicorn settings as the service (``uvicorn bench.bare_app:app``)."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()
TRACKS = list(range(1_000, 1_025))


@app.get("/bare/{user_id}")
def bare(user_id: int) -> list[int]:
    """What a do-nothing recommendation endpoint costs: routing, a path parameter, JSON."""
    return TRACKS
