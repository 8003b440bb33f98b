"""Prometheus metrics: what the operator watches (requests, 402s, payments, sats, holds, Redis, queues).

Counters live in this process (prometheus-client's usual model); with several worker processes set
PROMETHEUS_MULTIPROC_DIR and /metrics merges every worker's files. Hold and queue figures are read from
Redis at scrape time, so they are the same whichever process answers.
"""
from __future__ import annotations

import time
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REQUESTS", "CHALLENGES", "PAYMENTS", "SATS", "EXPIRED", "REORGS", "ONCHAIN_VANISHED", "REDIS_LATENCY",
           "metrics_middleware", "REGISTRY"]

REGISTRY = CollectorRegistry()
REQUESTS = Counter("microtasks_http_requests_total", "HTTP requests by route template, method and status",
                   ["route", "method", "status"], registry=REGISTRY)
DURATION = Histogram("microtasks_http_request_duration_seconds", "Time to answer, by route template", ["route"],
                     buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=REGISTRY)
CHALLENGES = Counter("microtasks_payment_required_total", "402 challenges issued, by route and reason",
                     ["route", "reason"], registry=REGISTRY)
PAYMENTS = Counter("microtasks_payments_total", "Paid calls by payment method and outcome (captured, voided)",
                   ["method", "outcome"], registry=REGISTRY)
SATS = Counter("microtasks_sats_total", "Satoshis by flow: captured, voided (hold released), refunded",
               ["flow"], registry=REGISTRY)
EXPIRED = Counter("microtasks_holds_expired_total", "Holds voided by the sweeper after their timeout",
                  registry=REGISTRY)
REORGS = Counter("microtasks_deposits_reorged_total", "Credited deposits a chain reorganisation took away "
                 "(counted by chainwatch)", registry=REGISTRY)
ONCHAIN_VANISHED = Counter("microtasks_onchain_payments_vanished_total", "Booked on-chain call payments whose "
                           "transaction disappeared (double-spent, dropped, reorged out), reversed by chainwatch",
                           registry=REGISTRY)
REDIS_LATENCY = Histogram("microtasks_redis_ping_seconds", "Round trip of the health monitor's PING",
                          buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25, 1), registry=REGISTRY)
_GAUGE = {"multiprocess_mode": "mostrecent"}
HOLDS = Gauge("microtasks_holds_pending", "Payment holds not yet captured or voided", registry=REGISTRY, **_GAUGE)
HOLD_AGE = Gauge("microtasks_hold_oldest_age_seconds", "Age of the oldest pending hold", registry=REGISTRY, **_GAUGE)
QUEUE = Gauge("microtasks_queue_depth", "Work waiting, by queue", ["queue"], registry=REGISTRY, **_GAUGE)
REVERSED = Gauge("microtasks_deposits_reversed", "Credited deposits reversed by a reorg and not confirmed again",
                 registry=REGISTRY, **_GAUGE)
READY = Gauge("microtasks_ledger_ready", "1 while Redis answers and the ledger is bootstrapped", registry=REGISTRY,
              **_GAUGE)


def route_of(request: web.Request) -> str:
    """The route template (`/v1/experts/{username}`), never the raw path: bounded label values."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Outermost: sees the status the client gets, error responses included."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = route_of(request)
        REQUESTS.labels(route, request.method, str(status)).inc()
        DURATION.labels(route).observe(time.perf_counter() - started)
