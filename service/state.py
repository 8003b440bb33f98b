"""Typed application state keys (aiohttp AppKey), shared by the app factory and the handlers."""
from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from .chain.addresses import AddressBook
from .chain.backends import ChainBackend
from .config import Settings
from .experts import Experts
from .invoices import Invoices
from .page_asks import PageAsks
from .payouts import Payouts
from .ledger import Ledger
from .payments import PaymentMethods
from .pricing import PriceRule
from .qa.crowd import Crowd
from .rates import RateSource
from .qa.runs import RunStore

__all__ = ["SETTINGS", "REDIS", "LEDGER", "INVOICES", "PRICES", "METHODS", "RUNS", "CROWD", "EXPERTS", "PAYOUTS", "ADDRESSES", "CHAIN", "RATES", "HEALTH", "LIMITER", "PAGE_ASKS"]

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
LEDGER = web.AppKey("ledger", Ledger)
INVOICES = web.AppKey("invoices", Invoices)
PRICES = web.AppKey("prices", dict[str, PriceRule])
METHODS = web.AppKey("methods", PaymentMethods)
RUNS = web.AppKey("runs", RunStore)
CROWD = web.AppKey("crowd", Crowd)
EXPERTS = web.AppKey("experts", Experts)
PAYOUTS = web.AppKey("payouts", Payouts)
ADDRESSES = web.AppKey("addresses", AddressBook)  # only with PAYEE_XPUB
CHAIN = web.AppKey("chain", ChainBackend)  # only with CHAIN set
RATES = web.AppKey("rates", RateSource)
HEALTH = web.AppKey("health", object)  # service.app.RedisHealth
LIMITER = web.AppKey("limiter", object)  # service.ratelimit.RateLimiter
PAGE_ASKS = web.AppKey("page_asks", PageAsks)  # asks from the web pages, paid by a confirmed deposit
