"""The public pages in a real browser: headless Chromium (Debian's package) driven by Playwright loads each
page from a running server, checks what a person sees, follows the ask flow up to the payment QR code, and
saves a screenshot of each page under test-artifacts/screenshots (BROWSER_ARTIFACTS overrides).

Skipped, with the reason, when the `playwright` package or a Chromium executable is missing: `make test`
installs both where it can (pip extra `browser`; `apt-get install chromium` when apt is usable).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from service.client import PaidSession

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("BROWSER_ARTIFACTS", ROOT / "test-artifacts" / "screenshots"))
SEED = "000102030405060708090a0b0c0d0e0f"  # BIP32 test vector 1 (public test material, testnet)
HOSTILE = '<img src=x onerror=alert(1)><script>alert(2)</script>'


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("no browser test: the 'playwright' package is not installed (pip install -e '.[browser]')")
    executable = _chromium()
    if executable is None:
        pytest.skip("no browser test: no Chromium executable (apt-get install chromium, or set CHROMIUM=/path)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        await b.close()


@pytest.fixture
async def site(aiohttp_server, make_app, funded, http) -> dict[str, Any]:
    """A running server whose xpub allows on-chain asks, one expert (hostile bio) and one list."""
    from bitcoinlib.keys import HDKey

    vpub = HDKey.from_seed(SEED, network="testnet", witness_type="segwit").subkey_for_path("m/84'/1'/0'").public().wif()
    server = await aiohttp_server(make_app(payee_xpub=vpub))
    url = str(server.make_url("")).rstrip("/")
    expert = await funded(0, "alice-k8s")
    profile = {"display_name": "Alice Kubernetes", "bio": "CKA, SIG Network reviewer.\n" + HOSTILE,
               "tags": ["networking", "cni"], "price_usd": "2.50", "reply_hours": 48, "payout": "charity:coincenter",
               "available_for_hire": True, "github": "alice-k8s", "twitter": "alice_k8s", "linkedin": "alice-k8s"}
    async with PaidSession(expert, session=http) as s:
        assert (await s.signed("PUT", f"{url}/v1/experts/me", profile))[0] == 200
        assert (await s.signed("POST", f"{url}/v1/lists", {"name": "kubernetes", "price": 2000,
                                                            "description": "Kubernetes experts, any SIG"}))[0] == 201
    return {"url": url, "expert": expert.username}


async def _open(browser: Any, url: str, name: str) -> Any:
    """A new page at `url` that records CSP violations and any dialog (a script that ran), screenshotted."""
    page = await browser.new_page(viewport={"width": 1000, "height": 800})
    page.problems = []
    page.on("console", lambda m: page.problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("dialog", lambda d: page.problems.append(f"dialog: {d.message}"))
    response = await page.goto(url)
    assert response.status == 200, await page.content()
    # the stylesheet applied (its CSP hash matched): the body is width-limited
    assert await page.evaluate("getComputedStyle(document.body).maxWidth") != "none"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    return page


async def test_each_page_in_chromium(browser, site):
    url, expert = site["url"], site["expert"]
    page = await _open(browser, f"{url}/", "home")
    assert "Two ways to pay" in await page.inner_text("main")
    await page.click("text=1 expert")
    assert page.url.endswith("/experts")
    page = await _open(browser, f"{url}/experts", "experts")
    assert "Alice Kubernetes" in await page.inner_text("main")
    page = await _open(browser, f"{url}/experts/{expert}", "expert")
    main = await page.inner_text("main")
    assert "4167 sat" in await page.inner_text("#price")  # $2.50 at 60000 USD/BTC, rounded up
    assert "Coin Center (charity)" in main and "unverified" in main and "alice_k8s" in main
    assert HOSTILE in await page.inner_text(".bio")  # shown as text, never run
    assert await page.locator("img").count() == 0
    page = await _open(browser, f"{url}/lists", "lists")
    assert "kubernetes" in await page.inner_text("main")
    page = await _open(browser, f"{url}/lists/kubernetes", "list")
    assert "2000 sat" in await page.inner_text("#price") and expert in await page.inner_text("main")
    page = await _open(browser, f"{url}/catalog", "catalog")
    assert "/v1/qa/validate" in await page.inner_text("main")
    assert not page.problems, page.problems


async def test_ask_flow_up_to_the_qr_code(browser, site):
    url, expert = site["url"], site["expert"]
    page = await _open(browser, f"{url}/experts/{expert}", "expert-form")
    await page.fill("#text", "Why does my Service have no endpoints? <b>really</b>")
    await page.fill("#issue", "https://github.com/kubernetes/kubernetes/issues/123")
    await page.click("#ask")
    await page.wait_for_url("**/asks/*")
    assert await page.locator("#qr svg").is_visible()
    href = await page.get_attribute("#bip21", "href")
    address = await page.inner_text("#address")
    assert href.startswith(f"bitcoin:{address}?amount=0.00004167&label=")
    assert await page.inner_text("#status") == "awaiting payment"
    assert "<b>really</b>" in await page.inner_text(".bio")
    assert f"microtasks ask {expert}" in await page.inner_text("#cli")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "ask.png"), full_page=True)
    # a bad issue URL comes back as the form with its error, the text kept
    page = await _open(browser, f"{url}/experts/{expert}", "expert-form-error")
    await page.fill("#text", "kept")
    await page.fill("#issue", "https://github.com/someone/else/issues/1")
    await page.click("#ask")
    assert "Kubernetes GitHub issue" in await page.inner_text("#errors")
    assert await page.input_value("#text") == "kept"
    assert not page.problems, page.problems
