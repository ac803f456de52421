"""A bare FastAPI app: the baseline ``benchmarks/echo.py`` measures the service against.

    .venv/bin/python -m uvicorn benchmarks.echo_app:app --host 127.0.0.1 --port 8001 \\
        --no-access-log --log-level warning

``POST /recommend/session`` parses the JSON body and returns it; ``GET /healthz`` answers
``{"status": "ok"}``. No validation model, no middleware, no state: what FastAPI + uvicorn cost
per request on this machine, with the server settings ``sessionrec serve`` uses (one worker,
uvicorn's default loop and HTTP parser — uvloop and httptools when installed — access log off).
"""

from __future__ import annotations

from fastapi import FastAPI, Request

app = FastAPI(title="echo", docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/recommend/session")
async def recommend(request: Request) -> dict:
    return await request.json()


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}
