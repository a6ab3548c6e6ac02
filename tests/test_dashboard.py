"""``/dashboard``: its feed on hand-made clusters (rates, quantiles over the window, debt
cycles, migrations), and the page itself in headless Chromium against the real server
(tiny model, 3 instances, small pools, an API key) while requests borrow: its numbers
equal ``/v1/cluster`` at that step, it returns to all-free when they finish, and it
loads nothing from any host but the server.

Chromium is Debian's (``apt-get install chromium``, as ``.ci/run`` does), driven by
Playwright's Python package with that executable (no browser download).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from infinite_llm.server.dashboard import Dashboard, debts, quantile
from infinite_llm.server.metrics import Recent

from test_dgfm import ring
from test_migration_protocol import add, cluster, step


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_feed_gives_rates_and_quantiles_over_the_window_per_sample():
    c = cluster(instances=2, blocks=8)
    add(c, "a", 20, max_tokens=4)
    step(c)
    views = [c.snapshot()]
    clock, recent = Clock(), Recent(keep_s=30)
    board = Dashboard("m", lambda: views[-1], recent, period_s=2, clock=clock)
    board.sample()  # the first sample: nothing to compare with yet
    assert board.feed()["series"] == []
    for k, seconds in enumerate([0.1, 0.2, 0.3, 0.4]):
        recent.add("ttft", clock.now + 0.5 * k, seconds)
    recent.add("itl", clock.now, 0.05)
    recent.finished, recent.generated = 4, 100
    step(c)
    views.append(c.snapshot())
    clock.now += 2
    board.sample()
    feed = board.feed()
    [point] = feed["series"]
    assert point["requests_per_s"] == 2 and point["tokens_per_s"] == 50
    assert point["ttft_p50_ms"] == pytest.approx(250) and point["ttft_p99_ms"] == pytest.approx(397)
    assert point["itl_p50_ms"] == pytest.approx(50) and point["e2e_p50_ms"] is None
    assert point["running"] == 1 and point["age_s"] == 0
    # Tokens computed a second by each home over the last two samples: one decode step
    # of the one request, at its home.
    home = views[-1].requests[0].home
    assert [i["tokens_per_s"] for i in feed["instances"]] == [
        0.5 if i == home else 0.0 for i in range(2)]
    # 40 s later the window (30 s) holds no sample: the quantiles are gone, not stale.
    clock.now += 40
    board.sample()
    assert board.feed()["series"][-1]["ttft_p50_ms"] is None
    assert [p["age_s"] for p in board.feed()["series"]] == [40, 0]


def test_the_feed_marks_the_debts_on_a_cycle_and_shows_what_migrated():
    c, requests = ring(3)
    view = c.snapshot()
    assert debts(view) == [{"debtor": i, "creditor": (i + 1) % 3, "blocks": 1, "in_cycle": True}
                           for i in range(3)]
    clock = Clock()
    board = Dashboard("m", lambda: view, Recent(keep_s=30), clock=clock)
    board.sample()
    clock.now += 5
    feed = board.feed()
    assert [(e["kind"], e["request_id"], e["source"], e["target"], e["age_s"])
            for e in feed["migrations"]] == [
        ("migrate", r.request_id, r.home, (r.home + 1) % 3, 5) for r in reversed(requests)]
    assert feed["totals"]["total_debt"] == 3
    own = [i["own"] + i["lent"] + i["free"] == i["capacity"] for i in feed["instances"]]
    assert all(own)
    # A chain is not a cycle: one request borrowing from the other instance.
    c = cluster(instances=2, blocks=8)
    add(c, "long", 36, max_tokens=20)
    step(c)
    assert debts(c.snapshot()) == [{"debtor": 0, "creditor": 1, "blocks": 1, "in_cycle": False}]


def test_quantiles_interpolate_between_order_statistics():
    assert quantile([], 0.5) is None
    assert quantile([3.0], 0.99) == 3.0
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)


def test_the_history_and_the_window_are_bounded():
    from infinite_llm.server import metrics

    recent = Recent(keep_s=30)
    for k in range(metrics.MAX_RECENT + 10):
        recent.add("itl", 0.0, 0.01)
    assert len(recent.since("itl", -1)) == metrics.MAX_RECENT
    c = cluster(instances=1, blocks=4)
    clock = Clock()
    board = Dashboard("m", c.snapshot, recent, period_s=1, history_s=10, clock=clock)
    for _ in range(30):
        board.sample()
        clock.now += 1
    assert len(board.feed()["series"]) == 10


# -- the page in a browser ---------------------------------------------------------------

KEY = "dashboard-test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs the dashboard in Debian's chromium: .ci/run installs it")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api.sync_playwright()


def _launch(playwright):
    # Chromium's own background connections are refused on a closed network; none is
    # wanted here anyway.
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-quic"])


def _page_numbers(page) -> dict:
    """What the page shows, read from its DOM."""
    return page.evaluate("""() => {
      const text = (root, k) => root.querySelector(`[data-k="${k}"]`).textContent;
      const instances = [...document.querySelectorAll('#instances [data-instance]')].map(
        (row) => Object.fromEntries(['own', 'lent', 'free', 'capacity', 'borrowed', 'batch',
                                     'waiting'].map((k) => [k, Number(text(row, k))])));
      const debts = [...document.querySelectorAll('#debts .edge')].map((e) => [
        Number(e.dataset.debtor), Number(e.dataset.creditor),
        Number(e.querySelector('[data-k="blocks"]').textContent), e.classList.contains('cycle')]);
      const requests = [...document.querySelectorAll('#requests tbody tr')].map((r) => ({
        id: r.dataset.request, home: Number(text(r, 'home')),
        tokens: Number(text(r, 'num_tokens')),
        blocks: Object.fromEntries([...r.querySelectorAll('[data-owner]')].map(
          (o) => [o.dataset.owner, Number(o.textContent.split(': ')[1])]))}));
      const total = (k) => document.querySelector(`[data-total="${k}"]`).textContent;
      return {steps: Number(document.body.dataset.steps), instances, debts, requests,
              running: Number(total('running')), waiting: Number(total('waiting')),
              debt: Number(total('total_debt').replace(/,/g, ''))};
    }""")


def _expected(cluster_json: dict) -> dict:
    """The same numbers, from ``/v1/cluster``."""
    instances = [{"own": i["used"], "lent": i["lent"], "free": i["free"],
                  "capacity": i["capacity"], "borrowed": i["borrowed"], "batch": i["running"],
                  "waiting": i["waiting"]} for i in cluster_json["instances"]]
    graph = {int(d): {int(c): n for c, n in e["borrowed_from"].items()}
             for d, e in cluster_json["ledger"]["instances"].items()}
    running = sorted((r for r in cluster_json["requests"] if r["status"] == "running"),
                     key=lambda r: (-r["num_tokens"], r["request_id"]))
    return {
        "steps": cluster_json["steps"], "instances": instances,
        "edges": sorted((d, c, n) for d, cs in graph.items() for c, n in cs.items()),
        "requests": [{"id": r["request_id"], "home": r["home"], "tokens": r["num_tokens"],
                      "blocks": r["blocks"]} for r in running[:20]],
        "running": cluster_json["num_requests_running"],
        "waiting": cluster_json["num_requests_waiting"],
        "debt": cluster_json["ledger"]["total_debt"],
    }


class _opened_at_exit:
    """Whatever happens, the engine is let go at the end, and the clients told to stop
    (else the server cannot stop)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        for event in self.events:
            event.set()


def _until_page(page, expression: str, what: str, timeout: float = 15.0):
    """Poll ``expression`` in the page until it is true (Playwright's own waiting
    evaluates strings, which the page's policy forbids, as it should)."""
    return _until(lambda: page.evaluate(expression), what, timeout)


def _until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_page_shows_the_pool_as_cluster_says_and_empties_when_requests_finish(
    tiny_llama_dir, tmp_path
):
    from infinite_llm import LLM

    from test_server_lifecycle import InProcessServer

    # 3 instances of 42 blocks (672 tokens): a 900-token prompt borrows.
    llm = LLM(str(tiny_llama_dir), instances=3, kv_cache_memory="512KiB", dtype="float32")
    open_gate = threading.Event()
    open_gate.set()
    real_step = llm.engine.step

    def gated_step():
        open_gate.wait()
        return real_step()

    llm.engine.step = gated_step
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path)
    headers = {"Authorization": f"Bearer {KEY}"}
    quiet = threading.Event()
    with InProcessServer(llm, api_key=KEY) as server, _browser() as playwright, \
            _opened_at_exit(open_gate, quiet):
        assert httpx.get(server.url + "/dashboard/feed").status_code == 401
        browser = _launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        loaded: list[str] = []
        page.on("request", lambda request: loaded.append(request.url))
        page.goto(server.url + "/dashboard")
        # The key, as every data route asks for it: a wrong one is refused.
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#key", "wrong")
        page.click("#key-form button")
        _until_page(page, "document.querySelector('#key-error').textContent.length > 0",
                    "the key to be refused")
        page.fill("#key", KEY)
        page.click("#key-form button")
        page.wait_for_selector("#main:not([hidden])")

        def post(prompt_len: int, seed: int, max_tokens: int = 100) -> None:
            prompt = [(seed * 7 + k * 13) % 300 + 1 for k in range(prompt_len)]
            response = httpx.post(server.url + "/v1/completions", headers=headers, timeout=120,
                                  json={"prompt": prompt, "max_tokens": max_tokens,
                                        "temperature": 0, "ignore_eos": True})
            assert response.status_code == 200, response.text

        # First short requests, one after another on two clients, until the history has
        # a few samples (every 2 s) to draw.

        def chatter(seed: int) -> None:
            while not quiet.is_set():
                post(60, seed, max_tokens=30)

        chatters = [threading.Thread(target=chatter, args=(k,)) for k in (100, 200)]
        for client in chatters:
            client.start()
        _until(lambda: sum(p["tokens_per_s"] > 0 for p in httpx.get(
            server.url + "/dashboard/feed", headers=headers).json()["series"]) >= 3,
            "a few samples of throughput")
        clients = [threading.Thread(target=post, args=(n, k))
                   for k, n in enumerate([900, 300, 250, 200])]
        for client in clients:
            client.start()

        def cluster_now() -> dict:
            return httpx.get(server.url + "/v1/cluster", headers=headers).json()

        # Mid-workload, some request's KV on more than one instance: hold the engine there.
        _until(lambda: any(i["borrowed"] for i in cluster_now()["instances"])
               and cluster_now()["num_requests_running"] >= 3, "requests to borrow")
        open_gate.clear()
        steps = _until(lambda: (a := cluster_now()["steps"]) == (time.sleep(0.3) or
                                                                  cluster_now()["steps"]) and a,
                       "the engine to hold")
        want = _expected(cluster_now())
        assert want["steps"] == steps and want["edges"]
        _until_page(page, f"Number(document.body.dataset.steps) === {steps}", "the page")
        shown = _page_numbers(page)
        assert shown["steps"] == want["steps"]
        assert shown["instances"] == want["instances"]
        assert sorted((d, c, n) for d, c, n, _ in shown["debts"]) == want["edges"]
        assert shown["requests"] == want["requests"]
        assert (shown["running"], shown["waiting"], shown["debt"]) == (
            want["running"], want["waiting"], want["debt"])
        assert any(s["borrowed"] > 0 for s in shown["instances"])
        page.screenshot(path=str(shots / "dashboard-busy.png"), full_page=True)
        # On a phone: one column, nothing wider than the screen.
        phone = browser.new_context(viewport={"width": 390, "height": 844},
                                    device_scale_factor=2).new_page()
        phone.on("request", lambda request: loaded.append(request.url))
        phone.goto(server.url + "/dashboard")
        phone.fill("#key", KEY)
        phone.click("#key-form button")
        _until_page(phone, f"Number(document.body.dataset.steps) === {steps}", "the phone")
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        phone.screenshot(path=str(shots / "dashboard-phone.png"))
        phone.close()
        page.bring_to_front()  # a tab in the background runs no transitions

        open_gate.set()
        quiet.set()
        for client in clients + chatters:
            client.join(120)
            assert not client.is_alive()
        # The page follows: every bar back to all free, nobody owing anybody.
        _until_page(page, """(() => {
          const rows = [...document.querySelectorAll('#instances [data-instance]')];
          return rows.length === 3 && rows.every((r) =>
            r.querySelector('[data-k="free"]').textContent ===
              r.querySelector('[data-k="capacity"]').textContent &&
            ['own', 'lent', 'borrowed', 'batch'].every(
              (k) => r.querySelector(`[data-k="${k}"]`).textContent === '0'));
        })()""", "the bars to return to all free")
        idle = _page_numbers(page)
        assert idle["debts"] == [] and idle["requests"] == [] and idle["running"] == 0
        assert page.inner_text("#debt-note") == "nobody owes anybody"
        # Throughput was sampled while the requests ran (every 2 s): the chart has a line.
        page.wait_for_selector('[data-chart="rates"] [data-series="tokens_per_s"]', timeout=15000)
        page.screenshot(path=str(shots / "dashboard-idle.png"), full_page=True)
        resources = page.evaluate(
            "performance.getEntriesByType('resource').map((e) => e.name)")
        browser.close()
    # Nothing from any other host: every request the pages made went to this server.
    assert loaded and resources
    assert all(url.startswith(server.url + "/") for url in loaded + resources), [
        url for url in loaded + resources if not url.startswith(server.url + "/")]


def test_the_page_and_its_scripts_are_served_with_a_self_only_policy(tiny_llama_dir):
    from infinite_llm import LLM

    from test_server_lifecycle import InProcessServer

    llm = LLM(str(tiny_llama_dir), kv_cache_memory="1MiB")
    with InProcessServer(llm, api_key=KEY) as server:
        page = httpx.get(server.url + "/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace("http-equiv", "")  # no other host named
        for asset in ("dashboard.js", "dashboard.css"):
            served = httpx.get(f"{server.url}/dashboard/static/{asset}")
            assert served.status_code == 200 and "http://" not in served.text.replace(
                "http://www.w3.org/2000/svg", "")
        assert httpx.get(server.url + "/dashboard/static/../api.py").status_code == 404
        feed = httpx.get(server.url + "/dashboard/feed", headers={"Authorization": f"Bearer {KEY}"})
        assert feed.status_code == 200 and feed.json()["instances"][0]["free"] > 0
        assert httpx.get(server.url + "/dashboard/feed").status_code == 401
