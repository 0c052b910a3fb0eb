"""The baseline of the service benchmarks: a bare FastAPI endpoint returning 25 ints, served
by the same uvicorn settings as the service (``uvicorn bench.bare_app:app``).

``async def``: the fastest trivial endpoint the framework serves (a plain ``def`` would add a
thread-pool hop per request and make the service look better beside it)."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()
TRACKS = list(range(1_000, 1_025))


@app.get("/bare/{user_id}")
async def bare(user_id: int) -> list[int]:
    """What a do-nothing recommendation endpoint costs: routing, a path parameter, JSON."""
    return TRACKS
