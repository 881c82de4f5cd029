"""Asynchronous jobs: submit, poll, stream progress, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from ..deps import JobsDep, RequestIdDep
from ..jobs import FINAL
from ..protocol import GenerationRequest, JobView

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202)
async def create_job(
    body: GenerationRequest, response: Response, jobs: JobsDep, request_id: RequestIdDep
) -> JobView:
    job = jobs.create(body, request_id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return jobs.view(job)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, jobs: JobsDep) -> JobView:
    return jobs.view(jobs.get(job_id))


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse)
async def job_events(job_id: str, jobs: JobsDep) -> StreamingResponse:
    """Server-sent events: ``queued`` (again as the position changes), ``running``, ``progress``, final status."""
    job = jobs.get(job_id)
    return StreamingResponse(
        jobs.events(job),
        media_type="text/event-stream",
        # no-transform and X-Accel-Buffering: proxies must pass each event on as it comes.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, response: Response, jobs: JobsDep) -> JobView:
    """Cancel: a queued job at once (200); a running one stops at its next step (202)."""
    job = jobs.cancel(job_id)
    if job.status not in FINAL:
        response.status_code = 202
    return jobs.view(job)
