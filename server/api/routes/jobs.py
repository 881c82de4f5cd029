"""Asynchronous jobs: submit, poll, stream progress, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from server.api.deps import JobsDep, RequestIdDep, TenantDep, TimeoutDep
from server.api.openapi import V1, errors
from server.protocol import GenerationRequest, JobView
from server.runtime.jobs import FINAL

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202, responses=errors(*V1, 429))
async def create_job(
    body: GenerationRequest,
    response: Response,
    jobs: JobsDep,
    request_id: RequestIdDep,
    timeout_s: TimeoutDep,
    tenant: TenantDep,
) -> JobView:
    """Queue a generation; with X-Request-Timeout, the job fails (deadline_exceeded) once it passes."""
    job = jobs.create(body, request_id, timeout_s=timeout_s, tenant=tenant)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.get("/v1/jobs/{job_id}", responses=errors(*V1, 404))
async def get_job(job_id: str, jobs: JobsDep, tenant: TenantDep) -> JobView:
    return jobs.view(job_id, tenant=tenant)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={**errors(*V1, 404), 200: {"content": {"text/event-stream": {}}, "description": "events"}},
)
async def job_events(job_id: str, jobs: JobsDep, tenant: TenantDep) -> StreamingResponse:
    """Server-sent events: ``queued`` (again as the position changes), ``running``, ``progress``, final status."""
    return StreamingResponse(
        jobs.events(job_id, tenant=tenant),
        media_type="text/event-stream",
        # no-transform and X-Accel-Buffering: proxies must pass each event on as it comes.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )


@router.delete("/v1/jobs/{job_id}", responses={**errors(*V1, 404, 409), 202: {"model": JobView}})
async def cancel_job(job_id: str, response: Response, jobs: JobsDep, tenant: TenantDep) -> JobView:
    """Cancel: a queued job at once (200); a running one stops at its next step (202)."""
    job = jobs.cancel(job_id, tenant=tenant)
    if job.status not in FINAL:
        response.status_code = 202
    return job
