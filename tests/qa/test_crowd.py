"""Crowd QA over HTTP: escrowed rewards, leases, one payment per accepted result, refunds of the rest."""
from __future__ import annotations

import asyncio


from service.client import PaidSession
from service.keys import GRANTS
from service.ledger import user_account
from service.qa.crowd import Crowd

JUNIT = '<testsuites><testsuite name="e2e" tests="1" failures="0"><testcase name="pods"/></testsuite></testsuites>'
FAILED = JUNIT.replace('<testcase name="pods"/>', '<testcase name="pods"><failure message="crashloop"/></testcase>')


async def call(http, wallet, method, url, body=None):
    async with PaidSession(wallet, session=http) as s:
        return await s.signed(method, url, body)


async def runner(http, base_url, wallet, **labels):
    status, body = await call(http, wallet, "POST", f"{base_url}/v1/qa/runners", {"labels": labels})
    assert status == 201, body
    return body["id"]


async def post_job(http, base_url, buyer, **fields):
    job = {"title": "e2e on arm64", "labels": {"arch": "arm64"}, "reward": 100, "results_wanted": 3, **fields}
    status, body = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs", job)
    assert status == 201, body
    return body


async def claim_and_submit(http, base_url, wallet, runner_id, status="passed"):
    code, leased = await call(http, wallet, "POST", f"{base_url}/v1/qa/jobs/claim", {"runner": runner_id})
    if code == 204:
        return None
    assert code == 200, leased
    code, result = await call(http, wallet, "POST", f"{base_url}/v1/qa/jobs/{leased['job']}/result",
                              {"runner": runner_id, "status": status, "junit": FAILED if status == "failed" else JUNIT,
                               "log": "ok"})
    assert code == 201, result
    return result


async def test_three_wanted_four_runners_exactly_three_paid_rest_refunded(http, base_url, funded, ledger):
    buyer = await funded(1000)
    job = await post_job(http, base_url, buyer)
    assert job["escrow"] == 300
    assert (await ledger.balance(user_account(buyer.username))).posted == 700
    runners = [await funded(100) for _ in range(4)]
    ids = [await runner(http, base_url, w, arch="arm64", provider="bare-metal") for w in runners]
    results = await asyncio.gather(*[claim_and_submit(http, base_url, w, rid) for w, rid in zip(runners, ids)])
    submitted = [r for r in results if r]
    assert len(submitted) == 3  # the 4th finds every slot leased
    for r in submitted:
        code, body = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/results/{r['id']}/accept")
        assert code == 200 and body["state"] == "accepted"
    code, again = await call(http, buyer, "POST",
                             f"{base_url}/v1/qa/jobs/{job['id']}/results/{submitted[0]['id']}/accept")
    assert code == 200  # accepting twice pays once
    paid = [(await ledger.balance(user_account(w.username))).posted - 100 for w in runners]
    assert sorted(paid) == [0, 100, 100, 100]  # stakes came back with the rewards
    code, closed = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/close")
    assert closed["escrow"] == 0 and closed["status"] == "closed"
    assert (await ledger.balance(user_account(buyer.username))).posted == 700
    assert (await ledger.reconcile()).ok


async def test_rejected_result_frees_its_slot_and_unearned_reward_returns(http, base_url, funded, ledger):
    buyer = await funded(1000)
    job = await post_job(http, base_url, buyer, results_wanted=1)
    a, b = await funded(100), await funded(100)
    ra, rb = await runner(http, base_url, a, arch="arm64"), await runner(http, base_url, b, arch="arm64")
    first = await claim_and_submit(http, base_url, a, ra, "failed")
    assert await claim_and_submit(http, base_url, b, rb) is None  # the one slot is taken
    await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/results/{first['id']}/reject")
    second = await claim_and_submit(http, base_url, b, rb)
    assert second is not None
    await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/close")
    assert (await ledger.balance(user_account(a.username))).posted == 100 - 20  # its stake, forfeited
    assert (await ledger.balance(user_account(buyer.username))).posted == 1000  # never gains a's stake
    assert (await ledger.reconcile()).ok


async def test_no_submit_without_a_lease_nor_twice(http, base_url, funded):
    buyer, worker = await funded(1000), await funded(100)
    job = await post_job(http, base_url, buyer)
    rid = await runner(http, base_url, worker, arch="arm64")
    body = {"runner": rid, "status": "passed", "junit": JUNIT}
    code, err = await call(http, worker, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/result", body)
    assert (code, err["error"]) == (409, "no_lease")
    await claim_and_submit(http, base_url, worker, rid)
    code, err = await call(http, worker, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/result", body)
    assert (code, err["error"]) == (409, "no_lease")
    code, _ = await call(http, worker, "POST", f"{base_url}/v1/qa/jobs/claim", {"runner": rid})
    assert code == 204  # a runner gets each job once


async def test_labels_must_match(http, base_url, funded):
    buyer, worker = await funded(1000), await funded(100)
    await post_job(http, base_url, buyer)
    rid = await runner(http, base_url, worker, arch="amd64")
    code, _ = await call(http, worker, "POST", f"{base_url}/v1/qa/jobs/claim", {"runner": rid, "wait": 0.6})
    assert code == 204


async def test_expired_lease_goes_back_to_the_queue(aiohttp_server, make_app, http, ledger, settings):
    server = await aiohttp_server(make_app(crowd_lease=1))
    base = str(server.make_url("")).rstrip("/")
    from service.client import Wallet

    buyer, slow, fast = Wallet.generate("crowd-buyer"), Wallet.generate("crowd-slow"), Wallet.generate("crowd-fast")
    for w in (buyer, slow, fast):
        async with PaidSession(w, session=http) as s:
            await s.register(base)
    await ledger.post("grant-crowd", GRANTS, user_account(buyer.username), 500)
    for w in (slow, fast):
        await ledger.post(f"grant-{w.username}", GRANTS, user_account(w.username), 100)
    job = await post_job(http, base, buyer, results_wanted=1)
    r_slow, r_fast = await runner(http, base, slow, arch="arm64"), await runner(http, base, fast, arch="arm64")
    code, _ = await call(http, slow, "POST", f"{base}/v1/qa/jobs/claim", {"runner": r_slow})
    assert code == 200
    code, _ = await call(http, fast, "POST", f"{base}/v1/qa/jobs/claim", {"runner": r_fast})
    assert code == 204
    await asyncio.sleep(1.2)
    code, err = await call(http, slow, "POST", f"{base}/v1/qa/jobs/{job['id']}/result", {"runner": r_slow, "status": "passed", "junit": JUNIT})
    assert (code, err["error"]) == (409, "lease_expired")
    assert await claim_and_submit(http, base, fast, r_fast) is not None


async def test_two_independent_runners_agreeing_are_accepted_automatically(aiohttp_server, make_app, http, ledger):
    server = await aiohttp_server(make_app(crowd_dispute=0))  # no dispute window: paid at once
    base_url = str(server.make_url("")).rstrip("/")
    from service.client import Wallet

    buyer, a, b = (Wallet.generate(f"auto-{n}") for n in ("buyer", "a", "b"))
    for w, amount in ((buyer, 1000), (a, 100), (b, 100)):
        async with PaidSession(w, session=http) as s:
            await s.register(base_url)
        await ledger.post(f"grant-{w.username}", GRANTS, user_account(w.username), amount)
    job = await post_job(http, base_url, buyer, results_wanted=2, auto_accept=True)
    await claim_and_submit(http, base_url, a, await runner(http, base_url, a, arch="arm64"))
    assert (await ledger.balance(user_account(a.username))).posted == 100 - 20  # staked, not paid yet
    await claim_and_submit(http, base_url, b, await runner(http, base_url, b, arch="arm64"))
    assert [(await ledger.balance(user_account(w.username))).posted for w in (a, b)] == [200, 200]
    code, state = await call(http, buyer, "GET", f"{base_url}/v1/qa/jobs/{job['id']}")
    assert state["accepted"] == 2 and state["escrow"] == 0


async def test_job_needs_the_escrow_funds(http, base_url, funded, ledger):
    buyer = await funded(100)
    status, body = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs",
                              {"title": "x", "reward": 100, "results_wanted": 2})
    assert (status, body["error"]) == (402, "insufficient_funds")
    assert (await ledger.balance(user_account(buyer.username))).posted == 100


async def test_expired_job_refunds_the_buyer(http, base_url, funded, ledger, settings):
    buyer = await funded(1000)
    job = await post_job(http, base_url, buyer, expires_in=10)
    crowd = Crowd(ledger.redis, settings.redis_prefix, ledger)
    await ledger.redis.zadd(crowd._k("open"), {job["id"]: 1})  # as if its expiry had passed
    assert await crowd.expire_jobs() == 1
    assert (await ledger.balance(user_account(buyer.username))).posted == 1000
    code, state = await call(http, buyer, "GET", f"{base_url}/v1/qa/jobs/{job['id']}")
    assert state["status"] == "expired" and state["escrow"] == 0
    assert (await ledger.reconcile()).ok


async def test_accept_and_pay_are_one_step_a_redis_error_between_leaves_nothing_accepted_unpaid(
        http, base_url, funded, ledger, settings):
    """Issue 11.11: accepting a result and paying its reward are one atomic step. A Redis error in the
    payment (injected: the payment's transfer key is made the wrong type, so its script fails) must not
    leave the result accepted; `close` then refunds only what was never accepted, and a retry pays once."""
    buyer = await funded(1000)
    job = await post_job(http, base_url, buyer, results_wanted=1)
    worker = await funded(1000)
    result = await claim_and_submit(http, base_url, worker, await runner(http, base_url, worker, arch="arm64"))
    poison = ledger.keys.transfer(f"crowd:{job['id']}:pay:{result['id']}")
    await ledger.redis.set(poison, "not a transfer")
    url = f"{base_url}/v1/qa/jobs/{job['id']}/results/{result['id']}/accept"
    code, _ = await call(http, buyer, "POST", url)
    assert code >= 500
    code, state = await call(http, buyer, "GET", f"{base_url}/v1/qa/jobs/{job['id']}")
    assert [r["state"] for r in state["results"]] == ["submitted"] and state["accepted"] == 0
    await ledger.redis.delete(poison)
    code, accepted = await call(http, buyer, "POST", url)  # the retry pays, once
    assert (code, accepted["state"]) == (200, "accepted")
    code, _ = await call(http, buyer, "POST", url)
    assert code == 200
    code, closed = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/close")
    assert closed["escrow"] == 0 and closed["accepted"] == 1
    assert (await ledger.balance(user_account(worker.username))).posted == 1000 + 100  # reward, stake back
    assert (await ledger.balance(user_account(buyer.username))).posted == 900
    assert (await ledger.reconcile()).ok


async def test_close_racing_accept_never_refunds_an_accepted_reward(http, base_url, funded, ledger):
    """Issue 11.11: an accept and a close at the same time: the reward is either paid (and the result
    accepted) or the result is not accepted and the buyer has it back; never both, never neither."""
    for _ in range(5):
        buyer = await funded(1000)
        job = await post_job(http, base_url, buyer, results_wanted=1)
        worker = await funded(1000)
        result = await claim_and_submit(http, base_url, worker, await runner(http, base_url, worker, arch="arm64"))
        await asyncio.gather(
            call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/results/{result['id']}/accept"),
            call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/close"))
        code, state = await call(http, buyer, "GET", f"{base_url}/v1/qa/jobs/{job['id']}")
        paid = (await ledger.balance(user_account(worker.username))).posted - 1000  # the stake came back
        accepted = state["results"][0]["state"] == "accepted"
        assert paid == (100 if accepted else 0), state
        assert (await ledger.balance(user_account(buyer.username))).posted == 1000 - paid
        assert state["escrow"] == 0
    assert (await ledger.reconcile()).ok


MANIFESTS = """apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"""
NAMING = ('<testsuites><testsuite name="e2e" tests="2" failures="0">'
          '<testcase classname="ConfigMap/settings" name="mounted"/>'
          '<testcase classname="Deployment/web" name="rollout"/></testsuite></testsuites>')


async def submit(http, base_url, wallet, job_id, runner_id, junit, status="passed"):
    return await call(http, wallet, "POST", f"{base_url}/v1/qa/jobs/{job_id}/result",
                      {"runner": runner_id, "status": status, "junit": junit, "log": "ok"})


async def test_one_actor_with_two_accounts_cannot_drain_an_auto_accept_job(http, base_url, funded, ledger):
    """Issue 12.9: one slot per account per job; a result must carry JUnit evidence naming the job's
    manifests; auto-accepted rewards wait out a dispute window in which the buyer rejects them; and a
    rejected result forfeits the stake its claim cost, so sybil accounts lose money instead of draining."""
    buyer = await funded(30_000)
    job = await post_job(http, base_url, buyer, reward=5000, results_wanted=4, auto_accept=True,
                         manifests=MANIFESTS)
    assert job["escrow"] == 20_000 and job["stake"] == 1000
    a, b = await funded(2000), await funded(2000)
    ra = [await runner(http, base_url, a, arch="arm64") for _ in range(2)]
    rb = [await runner(http, base_url, b, arch="arm64") for _ in range(2)]
    claims = {}
    for wallet, rid in [(a, ra[0]), (a, ra[1]), (b, rb[0]), (b, rb[1])]:
        code, _ = await call(http, wallet, "POST", f"{base_url}/v1/qa/jobs/claim", {"runner": rid})
        claims[rid] = code
    assert [claims[r] for r in (*ra, *rb)] == [200, 204, 200, 204]  # one slot per account
    for junk in ("", "<testsuites/>", "not xml", JUNIT,
                 '<!DOCTYPE x [<!ENTITY a "aaaa">]><testsuites><testsuite><testcase name="&a;"/></testsuite></testsuites>',
                 NAMING.replace('failures="0"', 'failures="1"').replace('name="rollout"/>', 'name="rollout"><failure/></testcase>')):
        code, err = await submit(http, base_url, a, job["id"], ra[0], junk)
        assert (code, err["error"]) == (422, "invalid_evidence"), (junk, err)
    code, first = await submit(http, base_url, a, job["id"], ra[0], NAMING)
    assert (code, first["state"]) == (201, "submitted")
    code, second = await submit(http, base_url, b, job["id"], rb[0], NAMING)
    assert (code, second["state"]) == (201, "provisional")  # auto-accepted, not paid yet
    assert [(await ledger.balance(user_account(w.username))).posted for w in (a, b)] == [1000, 1000]
    for r in (first, second):
        code, body = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/results/{r['id']}/reject")
        assert (code, body["state"]) == (200, "rejected")
    code, closed = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/close")
    assert closed["escrow"] == 0
    assert [(await ledger.balance(user_account(w.username))).posted for w in (a, b)] == [1000, 1000]
    assert (await ledger.balance(user_account(buyer.username))).posted == 30_000  # stakes go to the operator
    assert (await ledger.reconcile()).ok


async def test_auto_accepted_rewards_are_released_after_the_dispute_window(
        aiohttp_server, make_app, http, ledger, settings):
    """Issue 12.9: undisputed, an auto-accepted result is paid (reward and stake back) once the window
    ends; after that it can no longer be rejected."""
    server = await aiohttp_server(make_app(crowd_dispute=1))
    base = str(server.make_url("")).rstrip("/")
    from service.client import Wallet

    buyer, a, b = (Wallet.generate(f"win-{n}") for n in ("buyer", "a", "b"))
    for w in (buyer, a, b):
        async with PaidSession(w, session=http) as s:
            await s.register(base)
        await ledger.post(f"grant-{w.username}", GRANTS, user_account(w.username), 1000)
    job = await post_job(http, base, buyer, results_wanted=2, auto_accept=True, manifests=MANIFESTS)
    results = []
    for w in (a, b):
        rid = await runner(http, base, w, arch="arm64")
        code, _ = await call(http, w, "POST", f"{base}/v1/qa/jobs/claim", {"runner": rid})
        assert code == 200
        results.append((await submit(http, base, w, job["id"], rid, NAMING))[1])
    crowd = Crowd(ledger.redis, settings.redis_prefix, ledger)
    assert await crowd.release_due() == 0  # still inside the window
    await asyncio.sleep(1.1)
    assert await crowd.release_due() == 2
    assert [(await ledger.balance(user_account(w.username))).posted for w in (a, b)] == [1100, 1100]
    code, err = await call(http, buyer, "POST", f"{base}/v1/qa/jobs/{job['id']}/results/{results[0]['id']}/reject")
    assert (code, err["error"]) == (409, "already_accepted")
    code, state = await call(http, buyer, "GET", f"{base}/v1/qa/jobs/{job['id']}")
    assert state["accepted"] == 2 and state["escrow"] == 0
    assert (await ledger.reconcile()).ok


async def test_expiry_waits_for_the_dispute_window_of_provisional_results(http, base_url, funded, ledger, settings):
    """Issue 12.9: a job that expires while auto-accepted results are still disputable stays open for
    the buyer to reject them until their window ends."""
    buyer = await funded(1000)
    job = await post_job(http, base_url, buyer, results_wanted=2, auto_accept=True, manifests=MANIFESTS)
    a, b = await funded(100), await funded(100)
    results = []
    for w in (a, b):
        rid = await runner(http, base_url, w, arch="arm64")
        code, _ = await call(http, w, "POST", f"{base_url}/v1/qa/jobs/claim", {"runner": rid})
        assert code == 200
        results.append((await submit(http, base_url, w, job["id"], rid, NAMING))[1])
    crowd = Crowd(ledger.redis, settings.redis_prefix, ledger)
    await ledger.redis.zadd(crowd._k("open"), {job["id"]: 1})  # as if its expiry had passed
    assert await crowd.expire_jobs() == 0
    code, body = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/results/{results[0]['id']}/reject")
    assert (code, body["state"]) == (200, "rejected")
    code, state = await call(http, buyer, "GET", f"{base_url}/v1/qa/jobs/{job['id']}")
    assert state["status"] == "open" and state["escrow"] == 200
    assert [(await ledger.balance(user_account(w.username))).posted for w in (a, b)] == [80, 80]


async def test_a_buyer_never_profits_from_rejecting_honest_work(http, base_url, funded, ledger):
    """Second review: forfeited stakes went to the buyer, so rejecting every honest result and closing
    turned 50,000 into 60,000. A forfeited stake goes to the operator's revenue: rejecting gains nothing."""
    from service.ledger import REVENUE

    buyer = await funded(500)
    job = await post_job(http, base_url, buyer, reward=100, results_wanted=5)
    revenue = (await ledger.balance(REVENUE)).posted
    runners = [await funded(100) for _ in range(5)]
    ids = [await runner(http, base_url, w, arch="arm64") for w in runners]
    results = [await claim_and_submit(http, base_url, w, rid) for w, rid in zip(runners, ids)]
    for r in results:
        code, body = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/results/{r['id']}/reject")
        assert code == 200, body
    await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs/{job['id']}/close")
    assert (await ledger.balance(user_account(buyer.username))).posted == 500  # got its escrow back, nothing more
    assert (await ledger.balance(REVENUE)).posted == revenue + 5 * 20
    assert (await ledger.reconcile()).ok


async def test_an_unfunded_buyer_gets_402_before_its_manifests_are_parsed(http, base_url, funded, ledger,
                                                                          monkeypatch):
    """Second review: an account with no balance made the server parse ~1 MiB of YAML per job post."""
    import yaml

    calls: list[int] = []
    real = yaml.load_all
    monkeypatch.setattr(yaml, "load_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    buyer = await funded(0)
    manifests = "---\n".join(["apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c%d}\n" % i for i in range(400)])
    status, body = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs",
                              {"title": "x", "reward": 100, "results_wanted": 2, "manifests": manifests})
    assert (status, body["error"]) == (402, "insufficient_funds")
    assert calls == []


async def test_a_stake_taken_after_the_job_closed_is_refused_not_stranded(http, base_url, funded, ledger, settings):
    """Second review (code path): a claim whose stake is posted after `close` settled the stakes would
    leave that stake in the job's stake escrow for good. The interleaving is forced here: the claim
    script has run, `close` runs, then the stake is taken — it must be refused and nothing moved."""
    import pytest

    from service.errors import ApiError

    buyer, worker = await funded(1000), await funded(100)
    job = await post_job(http, base_url, buyer, results_wanted=1)
    rid = await runner(http, base_url, worker, arch="arm64")
    crowd = Crowd(ledger.redis, settings.redis_prefix, ledger)
    j = await crowd._job(job["id"])
    await crowd.close(job["id"], buyer.username)
    with pytest.raises(ApiError) as refused:
        await crowd._take_stake(j, worker.username, rid)
    assert refused.value.code == "job_closed"
    assert (await ledger.balance(user_account(worker.username))).posted == 100
    stakes = await ledger.balance(crowd.stake_escrow(job["id"]))
    assert stakes is None or stakes.posted == 0
    assert (await ledger.reconcile()).ok


async def test_a_job_whose_record_cannot_be_written_is_not_funded(http, base_url, funded, ledger, settings):
    """Escrow stuck after a Redis error: the job's record (with its expiry, so `close`/the sweeper can
    always refund its escrow) is written before the escrow is funded; if that write fails (injected: the
    open-jobs set is made the wrong type) the buyer is not charged, and once Redis is healthy posting works."""
    buyer = await funded(1000)
    crowd = Crowd(ledger.redis, settings.redis_prefix, ledger)
    await ledger.redis.set(crowd._k("open"), "not a zset")
    job = {"title": "e2e on arm64", "labels": {"arch": "arm64"}, "reward": 100, "results_wanted": 3}
    code, body = await call(http, buyer, "POST", f"{base_url}/v1/qa/jobs", job)
    assert code >= 500, body
    balance = await ledger.balance(user_account(buyer.username))
    assert (balance.posted, balance.pending_debits) == (1000, 0)
    await ledger.redis.delete(crowd._k("open"))
    posted = await post_job(http, base_url, buyer)
    assert posted["status"] == "open" and posted["escrow"] == 300
    assert (await ledger.balance(user_account(buyer.username))).posted == 700
    assert (await ledger.reconcile()).ok
