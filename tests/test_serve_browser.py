"""`slidechat serve`'s page in a real headless Chromium (the distribution's package, driven by Playwright).

Two servers run as the user starts them (`slidechat serve`, subprocess, 127.0.0.1, a free port): the slide
family on the demo slides with a tiny exported SlideChat, and the cytology family on synthetic cytology slides
with a tiny Qwen2-VL taught to answer with a box. Each check compares what the page shows with what the API
returned (positions in level-0 pixels, read back through OpenSeadragon's own coordinate conversions), so a page
that draws in the wrong place, or not at all, fails. Screenshots of each step are kept in
work_dirs/test_artifacts/serve/.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from playwright.sync_api import Browser, Page, Response, sync_playwright

from slidechat.data.synthetic_cytology import write_cytology_slides

from serve_box_model import BOX_ANSWER, BOX_QUESTION, teach_box_model
from serve_fixtures import build_serve_setup, write_screening_output

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "work_dirs" / "test_artifacts" / "serve"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLIDE = "demo_000_tumor"          # a 2560 x 2048 demo slide with features (build_serve_setup)
VIEWPORT = {"width": 1400, "height": 860}
BIG_CYTO = (6144, 5120)          # a cytology slide over the 4096 px a question may cover: the page sends a field
FIELD_MAX_SIDE = 4096
TILE_RE = re.compile(r"/api/slides/([^/]+)_files/(\d+)/(\d+)_(\d+)\.jpeg$")


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def serve_setup(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    # SLIDECHAT_SERVE_SETUP: a folder build_serve_setup already filled (saves its minute when iterating)
    prebuilt = os.environ.get("SLIDECHAT_SERVE_SETUP")
    return build_serve_setup(Path(prebuilt) if prebuilt else tmp_path_factory.getbasetemp() / "serve_setup")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `slidechat serve` process on 127.0.0.1; stopped (terminate, then kill) at the end."""

    def __init__(self, args: List[str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        exe = Path(sys.executable).with_name("slidechat")
        cmd = [str(exe), "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self._fh = open(log, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"slidechat serve exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/api/slides", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"slidechat serve did not answer /api/slides in {timeout:.0f} s:\n"
                             f"{self.log.read_text()}")

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._fh.close()


def _serving(work: Path, args: List[str]) -> Iterator[Server]:
    """``slidechat serve ARGS`` until the fixture using it ends (its log in ``work/serve.log``)."""
    server = Server(args, work / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slide_server(serve_setup: Dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("serve_slide")
    slides = work / "slides"  # the demo slides plus one that cannot be read (copies: symlinks out are refused)
    shutil.copytree(serve_setup["slides"], slides)
    (slides / "unreadable.svs").write_bytes(b"this is not a slide\n" * 64)
    write_screening_output(work / "screening", SLIDE, [(0, 0, 1024, 0.9), (1024, 0, 1024, 0.2), (0, 1024, 1024, 0.5)])
    yield from _serving(work, ["--slides", str(slides), "--features", str(serve_setup["features"]),
                               "--screening", str(work / "screening"),
                               "--checkpoint", str(serve_setup["slide_model"]), "--device", "cpu"])


@pytest.fixture(scope="module")
def box_model(serve_setup: Dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return teach_box_model(serve_setup["qwen2vl"], tmp_path_factory.mktemp("box_model") / "model", BOX_ANSWER)


@pytest.fixture(scope="module")
def cyto_server(serve_setup: Dict[str, Any], box_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("serve_cyto")
    slides = work / "slides"  # the small synthetic smears (asked whole) and one larger than a field
    shutil.copytree(serve_setup["cyto_slides"], slides)
    write_cytology_slides(work / "big", n_slides=1, seed=3, width=BIG_CYTO[0], height=BIG_CYTO[1],
                          prefix="cyto_big")
    shutil.copy(work / "big" / "slides" / "cyto_big_000.svs", slides)
    yield from _serving(work, ["--slides", str(slides), "--model_name_or_path", str(box_model), "--device", "cpu"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: run tools/setup_browser.sh"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


# The test's own copy of every /api/chat/stream body, as the server sent it: fetch is wrapped before the page's
# scripts run and the body is tee'd (DevTools keeps no body of a streamed response to read back afterwards).
_TEE_STREAMS = """
window.__streams = [];
const __fetch = window.fetch;
window.fetch = async function (input, init) {
  const resp = await __fetch.call(this, input, init);
  const url = typeof input === 'string' ? input : input.url;
  if (!url.includes('/api/chat/stream') || !resp.body) return resp;
  const [mine, theirs] = resp.body.tee();
  const rec = {status: resp.status, text: '', done: false};
  window.__streams.push(rec);
  (async () => {
    const reader = mine.getReader(), dec = new TextDecoder();
    for (;;) { const {value, done} = await reader.read(); if (done) break; rec.text += dec.decode(value, {stream: true}); }
    rec.text += dec.decode(); rec.done = true;
  })();
  return new Response(theirs, {status: resp.status, statusText: resp.statusText, headers: resp.headers});
};
"""


class PageWatch:
    """What the page did that a test asserts on: script errors, CSP refusals of our own files, responses."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: List[str] = []
        self.responses: List[Response] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("response", lambda r: self.responses.append(r))
        # CSP violations are events in the page; a listener added before any script runs records them
        page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', "
                             "e => window.__csp.push([e.violatedDirective, e.sourceFile, e.lineNumber]));")
        page.add_init_script(_TEE_STREAMS)

    def tiles(self, slide: str, since: int = 0) -> List[int]:
        """DeepZoom levels of the slide's tiles that loaded (HTTP 200, JPEG), from response ``since`` on."""
        out = []
        for r in self.responses[since:]:
            m = TILE_RE.search(r.url.split("?")[0])
            if m and m.group(1) == slide and r.status == 200 and \
                    r.headers.get("content-type", "").startswith("image/jpeg"):
                out.append(int(m.group(2)))
        return out

    def check_clean(self) -> None:
        assert not self.errors, f"script errors in the page: {self.errors}"
        # none at all: our files, and OpenSeadragon's one inline style (allowed by its hash in the policy)
        refused = self.page.evaluate("window.__csp")
        assert not refused, f"the page breaks its Content-Security-Policy: {refused}"


def _page(browser: Browser, server: Server) -> Tuple[Page, PageWatch]:
    """A fresh browser context on the server's page, loaded (slide list and model line fetched)."""
    ctx = browser.new_context(viewport=VIEWPORT)
    page = ctx.new_page()
    watch = PageWatch(page)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']", state="attached", timeout=30_000)
    return page, watch


def wait_js(page: Page, expr: str, timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``expr`` (a JS expression, evaluated through the DevTools protocol: the page's CSP forbids the
    eval that Playwright's wait_for_function needs) until it is truthy; bounded."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = page.evaluate(expr)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or expr} (last value {value!r})")


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def open_slide(page: Page, slide: str) -> None:
    page.click(f"[data-testid=slide-item][data-slide-id='{slide}']")
    page.wait_for_selector(f"body[data-slide-open='{slide}']", state="attached", timeout=30_000)
    wait_js(page, "window.slidechatViewer.world.getItemAt(0).getFullyLoaded()", what="the slide's first tiles")


def wait_still(page: Page, timeout: float = 15.0) -> None:
    """Until the viewer's springs have settled (current centre and zoom equal their targets)."""
    wait_js(page, "(() => { const v = window.slidechatViewer.viewport;"
                  " return v.getCenter(true).distanceTo(v.getCenter(false)) < 1e-12"
                  " && Math.abs(v.getZoom(true) - v.getZoom(false)) < 1e-12; })()", timeout, "the viewer to settle")


def element_image_rect(page: Page, selector: str) -> Dict[str, float]:
    """The element's on-screen box in level-0 pixels of the slide, through OSD's conversion, plus the
    screen pixels per level-0 pixel at this zoom."""
    return page.evaluate("""(sel) => {
        const v = window.slidechatViewer, item = v.world.getItemAt(0);
        const box = document.querySelector(sel).getBoundingClientRect();
        const c = v.container.getBoundingClientRect();
        const p0 = item.viewerElementToImageCoordinates(new OpenSeadragon.Point(box.left - c.left, box.top - c.top));
        const p1 = item.viewerElementToImageCoordinates(
            new OpenSeadragon.Point(box.right - c.left, box.bottom - c.top));
        return {x: p0.x, y: p0.y, w: p1.x - p0.x, h: p1.y - p0.y,
                zoom: item.viewportToImageZoom(v.viewport.getZoom(true))};
    }""", selector)


# ------------------------------------------------------------------------------------------- tests

def test_page_lists_slides_and_model_line(browser: Browser, slide_server: Server) -> None:
    page, watch = _page(browser, slide_server)
    api = slide_server.get_json("/api/slides")
    model = slide_server.get_json("/api/model")
    items = page.locator("[data-testid=slide-item]")
    assert items.count() == len(api) >= 4
    shown = [items.nth(i).get_attribute("data-slide-id") for i in range(items.count())]
    assert shown == [s["id"] for s in api]
    for s in api:  # each readable entry shows its size and whether it has features
        if s.get("error"):
            continue
        text = page.locator(f"[data-testid=slide-item][data-slide-id='{s['id']}']").inner_text()
        assert f"{s['width']} × {s['height']}" in text
        assert ("features ✓" if s["has_features"] else "features —") in text
    line = page.inner_text("[data-testid=model-line]")
    assert model["model_line"] and line.strip() == model["model_line"].strip()
    assert model["family"] == "slide"
    assert "TINY" in line.upper(), "a tiny test model must say so in the model line"
    shot(page, "01_slide_list")
    watch.check_clean()
    page.context.close()


def test_unreadable_slide_says_so(browser: Browser, slide_server: Server) -> None:
    page, watch = _page(browser, slide_server)
    broken = [s for s in slide_server.get_json("/api/slides") if s["id"] == "unreadable"]
    assert broken and broken[0]["error"], "the catalog should list the unreadable file with its error"
    item = page.locator("[data-testid=slide-item][data-slide-id='unreadable']")
    assert item.locator("[data-testid=slide-error]").inner_text().strip() == broken[0]["error"].strip()
    item.click()
    message = page.locator("[data-testid=viewer-message]")
    message.wait_for(state="visible", timeout=20_000)
    assert broken[0]["error"].strip() in message.inner_text()
    assert page.is_disabled("[data-testid=ask]"), "no question can be asked about a slide that cannot be read"
    assert page.evaluate("window.slidechatViewer.world.getItemCount()") == 0
    assert not [r.url for r in watch.responses if r.status >= 500], "a server error while showing the slide"
    shot(page, "01b_unreadable_slide")
    watch.check_clean()
    page.context.close()


def test_tiles_load_deeper_level_on_zoom_and_scale_bar(browser: Browser, slide_server: Server) -> None:
    page, watch = _page(browser, slide_server)
    info = slide_server.get_json(f"/api/slides/{SLIDE}")
    open_slide(page, SLIDE)
    wait_still(page)
    before = watch.tiles(SLIDE)
    assert before, "no tile of the slide loaded"
    deepest = max(before)
    max_level = math.ceil(math.log2(max(info["width"], info["height"])))  # DeepZoom: level n is 2^n px wide
    assert deepest < max_level, "the whole-slide view should not need full-resolution tiles"

    def scale() -> Dict[str, float]:
        return page.evaluate("""() => {
            const v = window.slidechatViewer, item = v.world.getItemAt(0), bar = document.querySelector(
                '[data-testid=scale-bar-line]');
            return {label: document.querySelector('[data-testid=scale-bar-label]').textContent,
                    px: bar.getBoundingClientRect().width,
                    zoom: item.viewportToImageZoom(v.viewport.getZoom(true))};
        }""")

    def check_scale(s: Dict[str, float]) -> float:
        m = re.fullmatch(r"(\d+(?:\.\d+)?) (µm|mm)", s["label"].strip())
        assert m, f"scale bar label {s['label']!r}"
        um = float(m.group(1)) * (1000.0 if m.group(2) == "mm" else 1.0)
        mantissa = um / 10 ** math.floor(math.log10(um))
        assert min(abs(mantissa - k) for k in (1, 2, 5)) < 1e-6, f"{um} µm is not a 1/2/5 x 10^k length"
        # the bar's screen length times the slide's µm per screen pixel must be the length it is labelled
        um_per_screen_px = info["mpp"] / s["zoom"]
        assert s["px"] * um_per_screen_px == pytest.approx(um, rel=0.03), (s, um)
        # a 1-2-5 series always has a length within a factor sqrt(2.5) of the 125 px aim
        assert 125 / math.sqrt(2.5) - 2 <= s["px"] <= 125 * math.sqrt(2.5) + 2, s
        return um

    um_before = check_scale(scale())
    shot(page, "02_slide_open")
    n_before = len(watch.responses)
    page.evaluate("(() => { const v = window.slidechatViewer.viewport; v.zoomBy(8); v.applyConstraints(true); })()")
    wait_still(page)
    deadline = time.monotonic() + 20  # (getFullyLoaded may still say true from before the zoom: watch the tiles)
    while time.monotonic() < deadline and not [lvl for lvl in watch.tiles(SLIDE, since=n_before) if lvl > deepest]:
        page.wait_for_timeout(100)
    after = watch.tiles(SLIDE, since=n_before)
    assert after and max(after) > deepest, (deepest, sorted(set(after)))
    wait_js(page, "window.slidechatViewer.world.getItemAt(0).getFullyLoaded()", what="tiles after zooming in")
    um_after = check_scale(scale())
    assert um_after < um_before, "zooming in must shorten the scale bar's length"
    shot(page, "03_zoomed_in")
    # a plain image has no MPP: the bar says so instead of inventing a length
    plain = [s for s in slide_server.get_json("/api/slides") if not s.get("error") and not s.get("mpp")]
    assert plain, "the setup should hold an image without MPP (field_tumor.png)"
    open_slide(page, plain[0]["id"])
    assert page.inner_text("[data-testid=scale-bar-label]").strip() == "no MPP"
    assert scale()["px"] < 1
    watch.check_clean()
    page.context.close()


def _bounds_match_slide(page: Page, layer: str) -> None:
    """The layer's world item has the slide's bounds: it covers exactly the level-0 extent."""
    b = page.evaluate("""(name) => { const w = window.slidechatViewer.world;
        const s = w.getItemAt(0).getBounds(), g = window.slidechat.layerItem(name).getBounds();
        return [s.x, s.y, s.width, s.height, g.x, g.y, g.width, g.height]; }""", layer)
    for a, c in zip(b[:4], b[4:]):
        assert c == pytest.approx(a, abs=2e-3), (layer, b)


def test_grid_layer_toggles_over_the_whole_slide(browser: Browser, slide_server: Server) -> None:
    page, watch = _page(browser, slide_server)
    info = slide_server.get_json(f"/api/slides/{SLIDE}")
    assert "grid" in info["layers"]
    # a slide picked and at once replaced by another: the viewer ends on the last one, alone
    page.click("[data-testid=slide-item][data-slide-id='demo_001_normal']")
    open_slide(page, SLIDE)
    count = "window.slidechatViewer.world.getItemCount()"
    page.wait_for_timeout(500)
    assert page.evaluate(count) == 1
    assert f"/{SLIDE}_files/" in page.evaluate("window.slidechatViewer.world.getItemAt(0).source.tilesUrl")
    page.check("[data-testid=layer-grid]")
    wait_js(page, "window.slidechat.layerItem('grid') !== null", what="the grid layer in the viewer")
    assert page.evaluate(count) == 2
    _bounds_match_slide(page, "grid")
    wait_js(page, "window.slidechat.layerItem('grid').getFullyLoaded()", what="the grid picture")
    shot(page, "04_grid_on")
    page.uncheck("[data-testid=layer-grid]")
    wait_js(page, f"{count} === 1", what="the grid layer to go away")
    assert page.evaluate("window.slidechat.layerItem('grid')") is None
    shot(page, "05_grid_off")
    # the screening scores of this slide are a layer too
    assert "screening" in info["layers"]
    page.check("[data-testid=layer-screening]")
    wait_js(page, "window.slidechat.layerItem('screening') !== null && "
                  "window.slidechat.layerItem('screening').getFullyLoaded()", what="the screening layer")
    _bounds_match_slide(page, "screening")
    shot(page, "05b_screening_on")
    watch.check_clean()
    page.context.close()


def _stream_lines(body: bytes) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]


def _ask(page: Page, question: str) -> List[Dict[str, Any]]:
    """Type a question, press Enter, wait for the answer; the NDJSON lines the server sent."""
    # record every text the answer bubble shows while it streams (each paint replaces its text node)
    page.evaluate("""() => {
        window.__painted = [];
        const list = document.querySelector('[data-testid=messages]');
        new MutationObserver(records => {
            for (const r of records) {
                const bubble = r.target.closest && r.target.closest('.msg.assistant');
                if (!bubble || !r.target.classList.contains('msg-text')) continue;
                for (const n of r.addedNodes) window.__painted.push(
                    [bubble.classList.contains('streaming'), n.textContent]);
            }
        }).observe(list, {childList: true, subtree: true});
    }""")
    answers = int(page.evaluate("Number(document.body.dataset.answers || 0)"))
    n = int(page.evaluate("window.__streams.length"))
    page.fill("[data-testid=question]", question)
    page.press("[data-testid=question]", "Enter")
    wait_js(page, f"window.__streams.length > {n} && window.__streams[{n}].done", timeout=120,
            what="the answer stream")
    rec = page.evaluate(f"window.__streams[{n}]")
    assert rec["status"] == 200, rec["text"][:500]
    wait_js(page, f"Number(document.body.dataset.answers || 0) > {answers} && document.body.dataset.busy === '0'",
            timeout=30, what="the page to show the answer")
    lines = _stream_lines(rec["text"].encode("utf-8"))
    assert lines and lines[-1].get("done") is True, lines[-3:]
    return lines


def test_question_streams_answer_and_evidence_centres_viewer(browser: Browser, slide_server: Server) -> None:
    page, watch = _page(browser, slide_server)
    info = slide_server.get_json(f"/api/slides/{SLIDE}")
    open_slide(page, SLIDE)
    lines = _ask(page, "What is the diagnosis of this slide?")
    done = lines[-1]
    tokens = [line["token"] for line in lines if "token" in line]
    assert tokens, "the server streamed no token"
    streamed = "".join(tokens)

    # streamed: while the bubble was streaming it showed growing prefixes of the tokens, then the final answer
    painted = page.evaluate("window.__painted")
    partial = [t for streaming, t in painted if streaming and t not in ("", "…")]
    assert partial, f"no streamed text was shown before the final answer: {painted[:5]}"
    assert all(streamed.startswith(t) for t in partial), partial[:3]
    assert page.locator("[data-testid=message-assistant] [data-testid=message-text]").last.inner_text().strip() \
        == done["answer"].strip()
    assert page.locator("[data-testid=message-user]").last.inner_text().find("diagnosis") >= 0
    assert page.get_attribute("[data-testid=session-line]", "data-session") == done["session"]
    shot(page, "06_answer")

    # the evidence layer: the picture the API named, over the whole slide
    assert done["evidence_url"] and done["evidence"]
    wait_js(page, "window.slidechat.layerItem('evidence') !== null && "
                  "window.slidechat.layerItem('evidence').getFullyLoaded()", what="the evidence layer")
    assert page.is_checked("[data-testid=layer-evidence]")
    assert page.is_visible("[data-testid=evidence-legend]")  # signed scores: against / for the answer
    assert any(r.url.endswith(done["evidence_url"]) and r.status == 200 for r in watch.responses)
    _bounds_match_slide(page, "evidence")
    items = page.locator("[data-testid=evidence-item]")
    assert items.count() == len(done["evidence"])
    top = done["evidence"][0]
    assert top["score"] == max(e["score"] for e in done["evidence"]), "evidence must come best first"
    assert 0 <= top["x"] < info["width"] and 0 <= top["y"] < info["height"]
    # each item shows its score to 3 significant digits, whatever its scale (gradient x input scores of a
    # trained model can be 1e-5: a fixed number of decimals showed them all as 0.0000)
    for k, ev in enumerate(done["evidence"]):
        shown = items.nth(k).locator(".ev-score").inner_text()
        value = float(shown.split()[-1])
        assert value == ev["score"] == 0 or abs(value - ev["score"]) <= 5e-3 * abs(ev["score"]), (shown, ev)
    for v in (1.6875e-05, -0.0876, 123.456, -4.2e-9):  # the rule on the scales scores come in
        shown = page.evaluate("(v) => window.slidechat.fmtScore(v)", v)
        assert abs(float(shown) - v) <= 5e-3 * abs(v) and shown.startswith("+" if v > 0 else "-"), (v, shown)
    shot(page, "07_evidence_layer")

    # clicking the top item centres the viewer on that patch and outlines it
    items.first.click()
    wait_still(page)
    centre = page.evaluate("""() => { const v = window.slidechatViewer;
        const p = v.world.getItemAt(0).viewportToImageCoordinates(v.viewport.getCenter(true));
        return [p.x, p.y]; }""")
    # OSD's springs end exactly on their target: the rest is float rounding of the coordinate conversions
    assert centre[0] == pytest.approx(top["x"] + top["w"] / 2, abs=1.0), (centre, top)
    assert centre[1] == pytest.approx(top["y"] + top["h"] / 2, abs=1.0), (centre, top)
    outline = element_image_rect(page, "[data-testid=patch-outline]")
    tol = 2.0 / outline["zoom"]  # the browser places an overlay to the nearest screen pixel on each edge
    for key in ("x", "y", "w", "h"):
        assert outline[key] == pytest.approx(top[key], abs=tol), (outline, top)
    shot(page, "08_evidence_clicked")

    # a second turn stays in the session (multi-turn)
    lines2 = _ask(page, "Which region supports that?")
    assert lines2[-1]["session"] == done["session"] and lines2[-1]["turn"] > done["turn"]
    assert page.locator("[data-testid=message-user]").count() == 2
    report = page.get_attribute("[data-testid=export-report]", "href")
    assert report == f"/api/sessions/{done['session']}/report.html"
    shot(page, "09_second_turn")
    with page.expect_popup() as popup_info:
        page.click("[data-testid=export-report]")
    popup = popup_info.value
    popup.wait_for_load_state()
    assert popup.url.endswith(report)
    assert "What is the diagnosis of this slide?" in popup.content()
    popup.close()

    # a new conversation forgets the session, its messages and its evidence
    page.click("[data-testid=new-chat]")
    assert page.locator("[data-testid=message-user]").count() == 0
    assert page.get_attribute("[data-testid=session-line]", "data-session") == ""
    assert page.evaluate("window.slidechat.layerItem('evidence')") is None
    assert page.evaluate("window.slidechatViewer.world.getItemCount()") == 1
    assert page.locator("[data-testid=evidence-item]").count() == 0
    assert page.get_attribute("[data-testid=export-report]", "aria-disabled") == "true"
    watch.check_clean()
    page.context.close()


def test_api_error_shown_as_one_line(browser: Browser, slide_server: Server) -> None:
    page, watch = _page(browser, slide_server)
    open_slide(page, SLIDE)
    question = "x" * 5000  # over the server's question limit (4000 characters by default)
    body = json.dumps({"slide": SLIDE, "question": question, "session": None, "field": None}).encode()
    req = urllib.request.Request(slide_server.url + "/api/chat/stream", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert 400 <= err.value.code < 500
    expected = json.loads(err.value.read())["error"]
    page.fill("[data-testid=question]", question)
    page.click("[data-testid=ask]")
    shown = page.locator("[data-testid=chat-error]")
    shown.wait_for(state="visible", timeout=20_000)
    text = shown.inner_text().strip()
    assert text == expected and "\n" not in text
    assert page.locator("[data-testid=message-error]").last.inner_text().strip() == expected
    assert page.is_enabled("[data-testid=ask]"), "the page must recover from a refused question"
    shot(page, "11_api_error")
    watch.check_clean()
    page.context.close()


def test_cytology_answer_box_drawn_where_the_api_says(browser: Browser, cyto_server: Server) -> None:
    page, watch = _page(browser, cyto_server)
    assert cyto_server.get_json("/api/model")["family"] == "cytology"
    slide = "cyto_000"
    assert max(cyto_server.get_json(f"/api/slides/{slide}")["width"], 0) <= FIELD_MAX_SIDE
    open_slide(page, slide)
    done = _ask(page, BOX_QUESTION)[-1]
    assert done["regions"], f"the box model's answer carried no region: {done['answer']!r}"
    boxes = page.locator("[data-testid=region-box]")
    assert boxes.count() == len(done["regions"])
    # the region's list item brings it into view, close enough that one screen pixel is under a level-0 pixel
    page.locator("[data-testid=region-item]").first.click()
    wait_still(page)
    region = done["regions"][0]
    drawn = element_image_rect(page, "[data-testid=region-box][data-index='0']")
    assert drawn["zoom"] > 1.0, drawn
    tol = 2.0 / drawn["zoom"]  # nearest screen pixel on each edge, in level-0 px
    for key in ("x", "y", "w", "h"):
        assert drawn[key] == pytest.approx(region[key], abs=tol), (drawn, region)
    shot(page, "10_cytology_box")
    watch.check_clean()
    page.context.close()


def test_cytology_large_slide_asks_about_the_viewed_field(browser: Browser, cyto_server: Server) -> None:
    page, watch = _page(browser, cyto_server)
    info = cyto_server.get_json("/api/slides/cyto_big_000")
    assert (info["width"], info["height"]) == BIG_CYTO
    open_slide(page, "cyto_big_000")
    # a square viewer: the tiny taught box model (tests/serve_box_model.py) answers reliably on square fields
    cw, ch = page.evaluate("(() => { const r = window.slidechatViewer.container.getBoundingClientRect();"
                           " return [Math.round(r.width), Math.round(r.height)]; })()")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": VIEWPORT["height"] + cw - ch})
    wait_js(page, "(() => { const s = window.slidechatViewer.viewport.getContainerSize();"
                  " return Math.abs(s.x - s.y) < 1; })()", what="a square viewer")
    # look at a part of the slide (level-0 px), as a user who zoomed in would
    page.evaluate("""() => { const v = window.slidechatViewer, item = v.world.getItemAt(0);
        v.viewport.fitBounds(item.imageToViewportRectangle(1000, 1000, 1024, 1024), true); }""")
    wait_still(page)
    view = page.evaluate("""() => { const v = window.slidechatViewer, item = v.world.getItemAt(0);
        const r = item.viewportToImageRectangle(v.viewport.getBounds(true));
        return [r.x, r.y, r.x + r.width, r.y + r.height]; }""")
    bodies: List[Dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/api/chat/stream") else None)
    done = _ask(page, BOX_QUESTION)[-1]
    field = bodies[-1]["field"]
    # the field is the view, clamped to the slide, in whole level-0 px
    x0, y0 = max(0.0, view[0]), max(0.0, view[1])
    x1, y1 = min(float(info["width"]), view[2]), min(float(info["height"]), view[3])
    assert max(field["w"], field["h"]) <= FIELD_MAX_SIDE
    for got, want in ((field["x"], x0), (field["y"], y0), (field["x"] + field["w"], x1), (field["y"] + field["h"], y1)):
        assert abs(got - want) <= 1.0, (field, view)
    assert done["regions"], f"the box model's answer carried no region: {done['answer']!r} (field {field})"
    region = done["regions"][0]
    assert field["x"] <= region["x"] and region["x"] + region["w"] <= field["x"] + field["w"], (region, field)
    assert field["y"] <= region["y"] and region["y"] + region["h"] <= field["y"] + field["h"], (region, field)
    page.locator("[data-testid=region-item]").first.click()
    wait_still(page)
    drawn = element_image_rect(page, "[data-testid=region-box][data-index='0']")
    tol = max(1.0, 2.0 / drawn["zoom"])
    for key in ("x", "y", "w", "h"):
        assert drawn[key] == pytest.approx(region[key], abs=tol), (drawn, region)
    shot(page, "12_cytology_field_box")
    watch.check_clean()
    page.context.close()
