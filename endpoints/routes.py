"""The route table: every route of the app, in one place (openapi.yaml must list each of them)."""
from __future__ import annotations

from aiohttp import web

from . import accounts, admin, crowd, experts, health, marketplace, qa, tokens

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    app.router.add_routes([
        web.get("/healthz", health.healthz),
        web.get("/readyz", health.readyz),
        web.get("/metrics", health.prometheus),
        web.get("/openapi.yaml", marketplace.openapi),
        web.get("/openapi.json", marketplace.openapi_json),
        web.get("/v1/catalog", marketplace.catalog),
        web.get("/.well-known/x402", marketplace.x402_discovery),
        web.get("/discovery/resources", marketplace.x402_discovery),
        web.post("/v1/accounts", accounts.register),
        web.get("/v1/accounts/me", accounts.me),
        web.put("/v1/accounts/me/payout", accounts.set_payout),
        web.post("/v1/accounts/me/withdrawals", accounts.withdraw),
        web.get("/v1/accounts/me/deposit-address", accounts.deposit_address),
        web.get("/v1/accounts/{username}", accounts.show),
        web.post("/v1/accounts/me/tokens", tokens.create),
        web.get("/v1/accounts/me/tokens", tokens.index),
        web.delete("/v1/accounts/me/tokens/{id}", tokens.revoke),
        web.get("/v1/receipts/{id}", accounts.receipt),
        web.post("/v1/admin/accounts", admin.create_account),
        web.post("/v1/admin/credits", admin.credit),
        web.post("/v1/qa/validate", qa.validate),
        web.get("/v1/qa/suites", qa.list_suites),
        web.post("/v1/qa/runs", qa.create_run),
        web.get("/v1/qa/runs/{id}", qa.show_run),
        web.get("/v1/qa/runs/{id}/junit.xml", qa.junit),
        web.post("/v1/qa/runners", crowd.register_runner),
        web.post("/v1/qa/jobs", crowd.post_job),
        web.post("/v1/qa/jobs/claim", crowd.claim),
        web.get("/v1/qa/jobs/{id}", crowd.show_job),
        web.post("/v1/qa/jobs/{id}/result", crowd.submit),
        web.post("/v1/qa/jobs/{id}/results/{rid}/accept", crowd.accept),
        web.post("/v1/qa/jobs/{id}/results/{rid}/reject", crowd.reject),
        web.post("/v1/qa/jobs/{id}/close", crowd.close),
        web.get("/v1/charities", experts.charities),
        web.get("/v1/experts", experts.list_experts),
        web.put("/v1/experts/me", experts.put_profile),
        web.get("/v1/experts/me/questions", experts.my_questions),
        web.post("/v1/experts/me/github", experts.github_proof),
        web.get("/v1/experts/{username}", experts.show_expert),
        web.post("/v1/experts/{username}/questions", experts.ask_expert),
        web.post("/v1/experts/{username}/hire-requests", experts.hire_request),
        web.get("/v1/lists", experts.lists),
        web.post("/v1/lists", experts.create_list),
        web.get("/v1/lists/{name}", experts.show_list),
        web.post("/v1/lists/{name}/members/me", experts.join),
        web.delete("/v1/lists/{name}/members/me", experts.leave),
        web.post("/v1/lists/{name}/members/{username}/approve", experts.approve),
        web.post("/v1/lists/{name}/questions", experts.ask_list),
        web.get("/v1/questions/{id}", experts.show_question),
        web.post("/v1/questions/{id}/reply", experts.reply),
        web.post("/v1/questions/{id}/withdraw", experts.withdraw),
        web.get("/v1/questions/{id}/responses", experts.responses),
    ])
