"""Linked accounts on an expert's profile; the GitHub one verified by a gist signed with the account's key,
read through a local stand-in for the GitHub REST API (GITHUB_API_URL)."""
from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from service import crypto
from service.client import PaidSession, Wallet
from service.profile_links import statement

GIST = "aa5a315d61ae9438b18d"


@pytest.fixture
async def github(aiohttp_server) -> dict[str, Any]:
    """GET /gists/{id} as api.github.com answers it (owner.login, files[*].content); `gists` is editable."""
    state: dict[str, Any] = {"gists": {}, "down": False}

    async def gist(request: web.Request) -> web.Response:
        if state["down"]:
            return web.json_response({"message": "Server Error"}, status=500)
        found = state["gists"].get(request.match_info["id"])
        if found is None:
            return web.json_response({"message": "Not Found"}, status=404)
        return web.json_response(found)

    app = web.Application()
    app.router.add_get("/gists/{id}", gist)
    server = await aiohttp_server(app)
    state["url"] = str(server.make_url("")).rstrip("/")
    return state


def publish(github: dict[str, Any], owner: str, content: str, gist_id: str = GIST) -> None:
    github["gists"][gist_id] = {"id": gist_id, "public": True, "owner": {"login": owner},
                                "files": {"proof.md": {"filename": "proof.md", "content": content}}}


def proof(wallet: Wallet, handle: str, key: bytes | None = None) -> str:
    text = statement(handle, wallet.username)
    return f"{text}\nsignature: {crypto.sign(key or wallet.private_key, text.encode())}\n"


@pytest.fixture
async def rig(aiohttp_server, make_app, github, http, funded):
    server = await aiohttp_server(make_app(github_api_url=github["url"]))
    url = str(server.make_url("")).rstrip("/")
    expert = await funded(0)

    async def call(method: str, path: str, body: Any = None, who: Wallet = expert) -> tuple[int, Any]:
        async with PaidSession(who, session=http) as s:
            return await s.signed(method, f"{url}{path}", body)

    status, body = await call("PUT", "/v1/experts/me", {"display_name": "Octo", "price": 100, "github": "Octo-Cat",
                                                        "twitter": "octo", "linkedin": "octo-cat"})
    assert status == 200, body
    return {"url": url, "expert": expert, "call": call}


async def test_handles_are_validated_and_shown_unverified(rig, http):
    status, body = await rig["call"]("PUT", "/v1/experts/me", {"display_name": "O", "price": 1, "github": "-bad-",
                                                               "twitter": "way_too_long_for_x_handles"})
    assert status == 422 and set(body["detail"]) == {"github", "twitter"}
    status, profile = await rig["call"]("GET", f"/v1/experts/{rig['expert'].username}")
    assert profile["accounts"] == {
        "github": {"handle": "Octo-Cat", "url": "https://github.com/Octo-Cat", "verified": False},
        "twitter": {"handle": "octo", "url": "https://x.com/octo", "verified": False},
        "linkedin": {"handle": "octo-cat", "url": "https://www.linkedin.com/in/octo-cat", "verified": False}}


async def test_a_signed_gist_of_the_account_verifies_github(rig, github, http):
    expert = rig["expert"]
    publish(github, "octo-cat", proof(expert, "Octo-Cat"))  # GitHub logins are case-insensitive
    status, profile = await rig["call"]("POST", "/v1/experts/me/github", {"gist": f"https://gist.github.com/octo-cat/{GIST}"})
    assert status == 200, profile
    assert profile["accounts"]["github"]["verified"] is True
    assert profile["accounts"]["github"]["proof"] == f"https://gist.github.com/Octo-Cat/{GIST}"
    async with http.get(f"{rig['url']}/experts/{expert.username}") as r:
        assert 'id="github-verified"' in await r.text()
    # a new handle is not covered by the old proof
    await rig["call"]("PUT", "/v1/experts/me", {"display_name": "Octo", "price": 100, "github": "someone-else"})
    status, profile = await rig["call"]("GET", f"/v1/experts/{expert.username}")
    assert profile["accounts"]["github"]["verified"] is False


@pytest.mark.parametrize("case", ["other_key", "other_owner", "other_statement", "missing", "not_a_gist"])
async def test_a_gist_that_proves_nothing_is_refused(rig, github, case):
    expert = rig["expert"]
    content = {"other_key": proof(expert, "Octo-Cat", key=Wallet.generate("mallory").private_key),
               "other_statement": proof(expert, "mallory")}.get(case, proof(expert, "Octo-Cat"))
    if case != "missing":
        publish(github, "mallory" if case == "other_owner" else "Octo-Cat", content)
    status, body = await rig["call"]("POST", "/v1/experts/me/github",
                                     {"gist": "../../user" if case == "not_a_gist" else GIST})
    assert status == 422 and body["error"] == "github_not_verified", body
    if case in ("other_key", "other_owner", "other_statement"):
        assert body["detail"]["statement"] == statement("Octo-Cat", expert.username)
    status, profile = await rig["call"]("GET", f"/v1/experts/{expert.username}")
    assert profile["accounts"]["github"]["verified"] is False


async def test_github_down_is_a_503_and_no_handle_a_422(rig, github, funded, http):
    github["down"] = True
    status, body = await rig["call"]("POST", "/v1/experts/me/github", {"gist": GIST})
    assert status == 503 and body["error"] == "github_unavailable"
    other = await funded(0)
    await rig["call"]("PUT", "/v1/experts/me", {"display_name": "N", "price": 1}, who=other)
    status, body = await rig["call"]("POST", "/v1/experts/me/github", {"gist": GIST}, who=other)
    assert status == 422 and "github" in body["detail"]
