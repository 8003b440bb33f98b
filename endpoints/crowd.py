"""Crowd QA: runners (contributors) claim jobs under a lease and submit results; buyers post jobs
(funded into escrow), accept or reject results, and close jobs."""
from aiohttp import web

from service.auth import authenticate
from service.schemas import ClaimSchema, CrowdJobSchema, ResultSchema, RunnerSchema, load_json
from service.state import CROWD, LEDGER, SETTINGS

_runner, _job, _claim, _result = RunnerSchema(), CrowdJobSchema(), ClaimSchema(), ResultSchema()


async def _me(request: web.Request) -> str:
    return await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)


async def register_runner(request: web.Request) -> web.Response:
    owner = await _me(request)
    data = await load_json(request, _runner)
    return web.json_response(await request.app[CROWD].register_runner(owner, data["labels"]), status=201)


async def post_job(request: web.Request) -> web.Response:
    buyer = await _me(request)
    d = await load_json(request, _job)
    job = await request.app[CROWD].post_job(
        buyer, title=d["title"], instructions=d["instructions"], manifests=d["manifests"], labels=d["labels"],
        reward=d["reward"], wanted=d["results_wanted"], expires_in=d["expires_in"], auto_accept=d["auto_accept"])
    return web.json_response(job, status=201, headers={"Location": f"/v1/qa/jobs/{job['id']}"})


async def show_job(request: web.Request) -> web.Response:
    buyer = await _me(request)
    return web.json_response(await request.app[CROWD].job(request.match_info["id"], buyer))


async def claim(request: web.Request) -> web.Response:
    owner = await _me(request)
    d = await load_json(request, _claim)
    job = await request.app[CROWD].claim(owner, d["runner"], d["wait"])
    return web.json_response(job) if job else web.Response(status=204)


async def submit(request: web.Request) -> web.Response:
    owner = await _me(request)
    d = await load_json(request, _result)
    result = await request.app[CROWD].submit(owner, request.match_info["id"], d["runner"], d["status"], d["junit"],
                                             d["log"])
    return web.json_response(result, status=201)


async def accept(request: web.Request) -> web.Response:
    buyer = await _me(request)
    return web.json_response(await request.app[CROWD].decide(buyer, request.match_info["id"],
                                                              request.match_info["rid"], "accepted"))


async def reject(request: web.Request) -> web.Response:
    buyer = await _me(request)
    return web.json_response(await request.app[CROWD].decide(buyer, request.match_info["id"],
                                                              request.match_info["rid"], "rejected"))


async def close(request: web.Request) -> web.Response:
    buyer = await _me(request)
    return web.json_response(await request.app[CROWD].close(request.match_info["id"], buyer))
