"""The viewer page in headless Chromium: a plan of a model these tests define (not one of
tests/models) loads from disk and from ``autoshard view`` with no console error and no request
besides the page, shows the mesh's axis names and the model's parameter names, and clicking an
op shows its strategy, rejected alternatives and source line. Skips, saying how to install
them, without Debian's chromium or playwright."""

import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request

import jax
import jax.numpy as jnp
import pytest

import autoshard

INSTALL = ("install Debian's chromium (apt-get install -y chromium) and playwright "
           "(pip install playwright==1.65.2; `playwright install` is not needed)")
sync_api = pytest.importorskip("playwright.sync_api", reason=f"no playwright: {INSTALL}")
if shutil.which("chromium") is None:
    pytest.skip(f"no chromium on PATH: {INSTALL}", allow_module_level=True)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def init(key):
    k = jax.random.split(key, 4)
    return {"stem": {"proj": jax.random.normal(k[0], (24, 48)) * 0.1},
            "mixers": [{"gate": jax.random.normal(k[i + 1], (48, 48)) * 0.1,
                        "shift": jnp.zeros((48,))} for i in range(2)],
            "decoder_head": jax.random.normal(k[3], (48, 6)) * 0.1}


def step(params, inputs, targets):
    def loss(p):
        h = jax.nn.relu(inputs @ p["stem"]["proj"])
        for m in p["mixers"]:
            h = h + jax.nn.sigmoid(h @ m["gate"] + m["shift"]) * h
        return jnp.mean(jax.nn.log_softmax(h @ p["decoder_head"]) * targets)
    value, grads = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda w, g: w - 0.05 * g, params, grads), value


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    mesh = jax.make_mesh((4, 2), ("replica", "shard"))
    args = (init(jax.random.key(0)), jax.random.normal(jax.random.key(1), (32, 24)),
            jax.nn.one_hot(jnp.arange(32) % 6, 6))
    fn = autoshard.compile(step, *args, mesh=mesh)
    return autoshard.dump(fn, tmp_path_factory.mktemp("viewer"),
                          verification=autoshard.verify(fn, *args))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                               args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url):
    """The page at ``url`` with every console error and request it makes recorded."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.errors, page.requests = [], []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    return page


def test_page_loads_offline_and_shows_mesh_and_parameters(browser, dump_dir):
    url = (dump_dir / "index.html").resolve().as_uri()
    page = open_page(browser, url)
    header = page.inner_text("#facts")
    assert "replica=4" in header and "shard=2" in header
    table = page.inner_text("#arg-table")
    for name in ["params['mixers'][1]['gate']", "params['decoder_head']", "params['stem']['proj']"]:
        assert name in table, name
    page.fill("#arg-search", "decoder_head")
    sync_api.expect(page.locator("#arg-table tbody tr")).to_have_count(2)
    for tab in ["graph", "costs", "memory", "pipeline", "verification"]:
        page.click(f"[data-tab={tab}]")
    assert "collective bytes" in page.inner_text("#verification-table")
    assert page.locator("#memory-chart path").count() == 2
    assert page.errors == []
    assert page.requests == [url]
    page.close()


def test_clicking_an_op_shows_its_panel(browser, dump_dir):
    page = open_page(browser, (dump_dir / "index.html").resolve().as_uri())
    page.click("[data-tab=graph]")
    tree = page.inner_text("#tree")
    assert "mixers[0]" in tree and "mixers[1]" in tree and "decoder_head" in tree
    page.click('#tree > .group[data-group="mixers[1]"] > .head')
    page.click('#tree .group.open .group > .head >> nth=0')
    page.click('#tree .group.open .group.open .group > .head >> nth=0')
    assert page.locator("#tree .group.open .node").count() > 0
    page.fill("#node-search", "dot_general mixers[1]")
    page.click("#results .node >> nth=0")
    panel = page.inner_text("#panel")
    assert "test_viewer.py" in page.inner_text("#panel-source")
    assert page.inner_text("#panel-strategy").strip()
    for section in ["Strategy", "Operands and results on the mesh", "Collectives it causes",
                    "Rejected alternatives", "replica", "shard"]:
        assert section in panel, section
    assert page.locator("#rejected tbody tr").count() >= 2     # the chosen one + alternatives
    assert page.locator("#panel .dev").count() >= 8            # every device of each layout
    RESULTS.mkdir(parents=True, exist_ok=True)
    shot = RESULTS / "viewer.png"
    page.screenshot(path=str(shot))
    assert 0 < shot.stat().st_size < 300_000
    assert page.errors == []
    page.close()


def test_view_serves_the_page_on_localhost(browser, dump_dir):
    server = subprocess.Popen([sys.executable, "-m", "autoshard.cli", "view", str(dump_dir),
                               "--no-browser", "--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        line = ""
        while "http://127.0.0.1:" not in line and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                pytest.fail(f"autoshard view exited: {server.stderr.read()}")
        url = line[line.index("http://"):].split()[0]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b'id="plan-data"' in response.read()
        page = open_page(browser, url)
        assert "replica=4" in page.inner_text("#facts")
        assert page.errors == [] and page.requests == [url]
        page.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
        server.stdout.close()
        server.stderr.close()
