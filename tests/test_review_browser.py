"""The review page in a real browser: Debian's Chromium (headless, driven by Playwright; no browser
download) against a real `uga serve` with a finished job. Sign in, see the slide's tiles, switch
overlays, open the top patch, draw (a brush stroke undone, a polygon), submit, and read the stored
mask back over the API; a viewer can look but not correct. Saves the README's screenshots to docs/."""

from __future__ import annotations

import io
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.server import REPO, TOKENS, Server, finished_patch_job, hostile_slide_root, wait_job

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
DOCS = REPO / "docs"
POLYGON = [(40, 40), (200, 40), (200, 120), (40, 120)]  # patch pixels (the patch is 256 px at 1 µm/px)
# the page's object URLs that are still alive (each holds its blob in memory until it is revoked)
COUNT_OBJECT_URLS = """(() => {
  const live = new Set(), create = URL.createObjectURL, revoke = URL.revokeObjectURL;
  URL.createObjectURL = (blob) => { const url = create(blob); live.add(url); return url; };
  URL.revokeObjectURL = (url) => { live.delete(url); revoke(url); };
  window.liveObjectUrls = live;
})();"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, source_slide):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    root = tmp_path_factory.mktemp("review-browser")
    srv = Server(root / "data", hostile_slide_root(root, source_slide)).start()
    with srv.client("annotator") as c:
        job = finished_patch_job(c)
    assert job["state"] == "succeeded", job
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Page:
    """A signed-in page, with what went wrong in it (script errors, refused tile requests)."""

    def __init__(self, browser, server: Server, role: str, token: str | None = None):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.problems: list[str] = []
        self.tiles: list[int] = []
        self.requests: list[str] = []  # every URL the page asked for, in order
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda exc: self.problems.append(f"script error: {exc}"))
        self.page.on("console", self._console)
        self.page.on("response", self._response)
        self.page.add_init_script(COUNT_OBJECT_URLS)
        self.page.goto(f"{server.url}/review")
        self.page.fill("#token", token or TOKENS[role])
        self.page.click("#sign-in-button")
        self.page.wait_for_selector("#viewer[data-ready=true]", timeout=30_000)

    def _console(self, message) -> None:
        if message.type == "error":  # where from: a blob's or a script's URL
            self.problems.append(f"console: {message.text} ({message.location.get('url', '')})")

    def _response(self, response) -> None:
        if "/slide_files/" in response.url:
            self.tiles.append(response.status)

    def canvas_point(self, x: float, y: float) -> tuple[float, float]:
        """The page position of patch pixel coordinate (x, y) on the editor's canvas."""
        box = self.page.locator("#mask-canvas").bounding_box()
        size = self.page.evaluate(
            "() => [document.getElementById('mask-canvas').width, document.getElementById('mask-canvas').height]"
        )
        return box["x"] + x * box["width"] / size[0], box["y"] + y * box["height"] / size[1]


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def test_an_annotator_reviews_and_corrects_a_patch_in_the_browser(server, browser):
    p = Page(browser, server, "annotator")
    page = p.page
    assert re.search(r"annotator:\w+ · annotator", page.inner_text("#who"))
    page.wait_for_function("() => document.querySelectorAll('#queue li').length === 4")
    page.wait_for_timeout(1000)  # the first tiles
    assert p.tiles and set(p.tiles) == {200}, p.tiles  # every tile request carried the bearer token

    # overlays: the outline is on by default; the uncertainty map is switched on, then to another measure
    page.wait_for_selector("#viewer[data-layers='outline']")
    page.check("#layer-heat")
    page.wait_for_selector("#viewer[data-layers='outline,uga']")
    assert "look here" in page.inner_text("#legend")
    page.select_option("#heat-measure", "entropy")
    page.wait_for_selector("#viewer[data-layers='entropy,outline']")
    assert "coin flip" in page.inner_text("#legend")
    assert "unlike the training data" in page.inner_text("[data-testid=ood-note]")  # the baseline's novelty verdict
    page.uncheck("#layer-outline")
    page.wait_for_selector("#viewer[data-layers='entropy']")
    page.check("#layer-outline")
    page.select_option("#heat-measure", "uga")
    page.wait_for_selector("#viewer[data-layers='outline,uga']")
    assert page.locator(".queue-box").count() == 4 and page.inner_text(".queue-box >> nth=0").strip() == "1"
    page.wait_for_timeout(1500)
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "review-viewer.png"))

    # the top patch: the model's mask to start from, the uncertainty inset
    page.click("#queue li >> nth=0")
    page.wait_for_selector("#editor[data-ready=true]")
    item_id = page.get_attribute("#editor", "data-item")
    with server.client("viewer") as c:
        item = c.get(f"/v1/queue/items/{item_id}").json()
        model = _png(c.get(item["links"]["mask"]).content) > 127
    assert item["rank"] == 1 and model.shape == (256, 256)
    assert page.is_visible("#inset-heat") and page.is_visible("#submit")

    # the patch in its surroundings: the slide's tiles around it, four times its side, the patch outlined
    page.wait_for_selector(f"#context-view[data-ready=true][data-item='{item_id}']")
    shown = page.evaluate(
        """() => {
          const v = OpenSeadragon.getViewer('context-view').viewport;
          const r = v.viewportToImageRectangle(v.getBounds(true));
          return [r.x, r.y, r.width, r.height];
        }"""
    )
    b = item["bbox_level0"]
    assert shown[0] <= b["x"] and shown[1] <= b["y"], (shown, b)
    assert shown[0] + shown[2] >= b["x"] + b["width"] and shown[1] + shown[3] >= b["y"] + b["height"], (shown, b)
    assert min(shown[2] / b["width"], shown[3] / b["height"]) == pytest.approx(4, rel=0.05), (shown, b)
    view, mark = page.locator("#context-view").bounding_box(), page.locator(".context-box").bounding_box()
    assert view["x"] < mark["x"] and mark["x"] + mark["width"] < view["x"] + view["width"]
    assert min(view["width"], view["height"]) / mark["width"] == pytest.approx(4, rel=0.1), (view, mark)

    # a brush stroke, undone with Ctrl+Z; then a polygon closed with Enter
    page.keyboard.press("b")
    page.mouse.move(*p.canvas_point(100, 200))
    page.mouse.down()
    page.mouse.move(*p.canvas_point(160, 200), steps=8)
    page.mouse.up()
    assert page.is_enabled("#undo")
    page.keyboard.press("Control+z")
    page.keyboard.press("p")
    for x, y in POLYGON:
        page.mouse.click(*p.canvas_point(x, y))
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)
    page.screenshot(path=str(DOCS / "review-editor.png"))
    with server.client("annotator") as c:  # the patch that opens next, fetched while this one is worked on
        pending = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"]
        following = next(i for i in pending if i["id"] != item_id)
    page.wait_for_function(
        "(id) => performance.getEntriesByType('resource').some((e) => e.name.includes(`/items/${id}/mask.png`))",
        arg=following["id"],
    )
    sent_at = len(p.requests)
    page.click("#submit")
    page.wait_for_selector("#editor[data-last-correction]")
    page.wait_for_function(f"() => document.getElementById('editor').dataset.item !== '{item_id}'")
    correction_id = page.get_attribute("#editor", "data-last-correction")
    page.wait_for_selector(f"#editor[data-ready=true][data-item='{following['id']}']")
    for part in ("image.png", "mask.png"):  # asked for once, ahead of time, not again when it opened
        asked = [i for i, url in enumerate(p.requests) if url.endswith(f"/items/{following['id']}/{part}")]
        assert len(asked) == 1 and asked[0] < sent_at, (part, asked, sent_at)

    # what the server stored is what was drawn: the model's mask plus the polygon (pixel centres inside)
    with server.client("viewer") as c:
        record = c.get(f"/v1/corrections/{correction_id}").json()
        stored = _png(c.get(f"/v1/corrections/{correction_id}/mask.png").content) > 127
    with server.client("annotator") as c:
        me = c.get("/v1/me").json()["name"]
    assert record["queue_item_id"] == item_id and record["annotator"] == me  # audited as the person
    drawn = np.zeros_like(model)
    drawn[40:120, 40:200] = True
    expected = model | drawn
    edge = np.zeros_like(model)  # one pixel either side of the polygon's edges: clicks land on whole screen px
    edge[38:42, 38:202] = edge[118:122, 38:202] = edge[38:122, 38:42] = edge[38:122, 198:202] = True
    assert not (stored != expected)[~edge].any()
    assert stored[42:118, 42:198].all()
    with server.client("annotator") as c:  # the next patch is open (claimed) now: in its reviewer's queue only
        pending = [i["id"] for i in c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"]]
    assert item_id not in pending and len(pending) == 3
    # the correction is listed with the mask it corrected, until a promoted model re-segments the slide
    mine = page.locator(f"#outcomes li[data-correction='{correction_id}']")
    mine.wait_for()
    assert "waiting for a promoted model" in mine.inner_text() and mine.locator("img").count() == 3
    page.wait_for_function(
        f"() => document.querySelector(\"#outcomes li[data-correction='{correction_id}'] img\").naturalWidth === 256"
    )
    # every tile, overlay, patch and thumbnail seen so far is shown without an object URL left behind
    page.wait_for_function("() => window.liveObjectUrls.size === 0", timeout=10_000)
    assert not p.problems, p.problems
    page.close()


def test_the_reviewer_zooms_into_the_patch_and_draws_where_they_point(server, browser):
    """+ enlarges the patch in its frame (which scrolls), keeping the point at the frame's centre in view;
    a brush dot lands on the patch pixel under the pointer at any zoom; 0 fits the patch again. Keys
    typed in the context view are the context view's."""
    p = Page(browser, server, "annotator")
    page = p.page
    page.wait_for_function("() => document.querySelectorAll('#queue li').length > 0")
    page.click("#queue li >> nth=0")
    page.wait_for_selector("#editor[data-ready=true]")
    assert page.get_attribute("#editor", "data-zoom") == "1" and page.is_disabled("#zoom-out")
    fitted = page.locator("#mask-canvas").bounding_box()
    page.uncheck("#show-model")
    page.focus("#mask-canvas")
    page.keyboard.press("c")  # an empty mask: only the dot is drawn
    page.keyboard.press("+")
    page.click("#zoom-in")
    page.wait_for_selector("#editor[data-zoom='4']")
    assert page.inner_text("#zoom-level") == "4×"
    zoomed, frame = page.locator("#mask-canvas").bounding_box(), page.locator("#editor-canvas-wrap").bounding_box()
    assert zoomed["width"] == pytest.approx(4 * fitted["width"], abs=1)
    assert frame["width"] < zoomed["width"] and frame["height"] < zoomed["height"]  # the frame scrolls
    x, y = p.canvas_point(128, 128)  # the patch's centre: at the frame's centre before, and still in view
    assert frame["x"] < x < frame["x"] + frame["width"] and frame["y"] < y < frame["y"] + frame["height"]
    page.focus("#mask-canvas")
    page.keyboard.press("b")
    page.mouse.click(x, y)
    page.keyboard.press("0")
    page.wait_for_selector("#editor[data-zoom='1']")
    assert page.locator("#mask-canvas").bounding_box()["width"] == pytest.approx(fitted["width"], abs=1)
    painted = page.evaluate(
        """() => {
          const c = document.getElementById('mask-canvas');
          const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          const xs = [], ys = [];
          for (let i = 0; i < a.length / 4; i++) {
            if (a[i * 4 + 3]) xs.push(i % c.width), ys.push(Math.floor(i / c.width));
          }
          return [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
        }"""
    )
    size = int(page.input_value("#brush-size"))
    assert abs((painted[0] + painted[1]) / 2 - 128) <= 1 and abs((painted[2] + painted[3]) / 2 - 128) <= 1, painted
    assert painted[1] - painted[0] <= size + 1 and painted[3] - painted[2] <= size + 1, (painted, size)

    # keys typed in the context view pan it (OpenSeadragon's w/a/s/d, +): they never decide or zoom the patch
    item_id = page.get_attribute("#editor", "data-item")
    page.wait_for_selector("#context-view[data-ready=true]")
    page.click("#context-view")
    for key in ("a", "s", "+"):
        page.keyboard.press(key)
    page.wait_for_timeout(500)
    assert page.get_attribute("#editor", "data-item") == item_id and page.is_visible("#editor")
    assert page.get_attribute("#editor", "data-last-correction") is None
    assert page.get_attribute("#editor", "data-zoom") == "1"
    assert not p.problems, p.problems
    page.close()


def test_unsaved_edits_are_kept_until_the_reviewer_lets_them_go(server, browser):
    """Edits not yet submitted survive a click on another patch (the page asks), and Enter on a focused
    button presses that button: Skip skips, it never submits the drawing as a correction."""
    p = Page(browser, server, "annotator")
    page = p.page
    page.wait_for_function("() => document.querySelectorAll('#queue li').length >= 2")
    page.click("#queue li >> nth=0")
    page.wait_for_selector("#editor[data-ready=true]")
    first = page.get_attribute("#editor", "data-item")
    page.keyboard.press("c")  # clear, then one stroke: a mask unlike the model's
    page.keyboard.press("b")
    page.mouse.move(*p.canvas_point(20, 20))
    page.mouse.down()
    page.mouse.move(*p.canvas_point(90, 20), steps=6)
    page.mouse.up()

    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    page.click("#queue li >> nth=1")
    page.wait_for_timeout(500)
    assert asked and "not submitted" in asked[0]
    assert page.get_attribute("#editor", "data-item") == first  # stayed, with the edits

    page.once("dialog", lambda d: (asked.append(d.message), d.accept()))
    page.focus("#skip")
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.getElementById('editor').dataset.item !== '{first}'")
    assert "discard your edits" in asked[1]
    with server.client("viewer") as c:
        skipped = c.get(f"/v1/queue/items/{first}").json()
        corrections = c.get("/v1/corrections").json()["corrections"]
    assert skipped["status"] == "skipped"
    assert all(x["queue_item_id"] != first for x in corrections)  # skipped, not stored as a correction
    assert not p.problems, p.problems
    page.close()


def test_a_drawing_survives_a_reload_and_an_empty_mask_is_never_sent_by_a_slip(server, browser):
    """The drawing not yet sent is kept in the tab (a reload, an expired sign-in): reopened, it is
    back and submits as drawn. A patch marked "no tumour at all" (an empty mask) asks first."""
    p = Page(browser, server, "annotator")
    page = p.page
    page.on("dialog", lambda d: d.accept() if d.type == "beforeunload" else None)
    page.wait_for_function("() => document.querySelectorAll('#queue li').length >= 2")
    page.click("#queue li >> nth=0")
    page.wait_for_selector("#editor[data-ready=true]")
    item = page.get_attribute("#editor", "data-item")
    page.keyboard.press("c")
    page.keyboard.press("b")
    page.mouse.move(*p.canvas_point(30, 200))
    page.mouse.down()
    page.mouse.move(*p.canvas_point(220, 200), steps=8)
    page.mouse.up()
    page.reload()  # signed in again from the tab's session
    page.wait_for_selector("#viewer[data-ready=true]", timeout=30_000)
    page.click(f"#queue li[data-item='{item}']")
    page.wait_for_selector(f"#editor[data-ready=true][data-item='{item}']")
    assert "not sent is back" in page.inner_text("#status")
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.getElementById('editor').dataset.item !== '{item}'")
    with server.client("viewer") as c:
        [stored] = [x for x in c.get("/v1/corrections").json()["corrections"] if x["queue_item_id"] == item]
        mask = _png(c.get(f"/v1/corrections/{stored['id']}/mask.png").content) > 127
    assert mask[200, 60:190].all() and mask[100, 60:190].sum() == 0  # the stroke, drawn before the reload

    page.wait_for_selector("#editor[data-ready=true]")
    other = page.get_attribute("#editor", "data-item")
    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    page.keyboard.press("c")
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)
    assert asked and "no tumour at all" in asked[0]
    assert page.get_attribute("#editor", "data-item") == other  # nothing sent: still on that patch
    with server.client("viewer") as c:
        assert c.get(f"/v1/queue/items/{other}").json()["status"] == "pending"
    assert not p.problems, p.problems
    page.close()


def test_a_viewer_can_look_but_not_correct(server, browser):
    p = Page(browser, server, "viewer")
    page = p.page
    assert page.inner_text("#who").endswith("viewer") and not page.is_visible("#model-panel")
    page.click("#queue li >> nth=0")
    page.wait_for_selector("#editor[data-ready=true]")
    assert page.is_visible("#read-only") and not page.is_visible("#submit") and not page.is_visible("#tools")
    item_id = page.get_attribute("#editor", "data-item")
    page.keyboard.press("Enter")  # no submit from the keyboard either
    page.wait_for_timeout(300)
    assert page.get_attribute("#editor", "data-last-correction") is None
    assert not p.problems, p.problems
    # and the server refuses it whatever the page does (the browser logs that 403)
    status = page.evaluate(
        """async (id) => (await fetch(`/v1/queue/items/${id}/correction`, {method: 'POST',
             headers: {Authorization: `Bearer ${sessionStorage.getItem('uga.token')}`, 'Content-Type': 'image/png'},
             body: new Uint8Array([137, 80, 78, 71])})).status""",
        item_id,
    )
    assert status == 403
    with server.client("viewer") as c:
        assert not [x for x in c.get("/v1/corrections").json()["corrections"] if x["queue_item_id"] == item_id]
    page.close()


def test_an_admin_sees_the_model_panel(server, browser):
    p = Page(browser, server, "admin")
    page = p.page
    page.wait_for_selector("#model-panel:not([hidden])")
    page.wait_for_function("() => document.getElementById('model-serving').textContent.includes('baseline')")
    page.wait_for_function("() => document.getElementById('runs').textContent.includes('none yet')")  # no run yet
    page.close()


def test_a_correction_sent_in_error_is_withdrawn_from_then_and_now(server, browser):
    p = Page(browser, server, "annotator")
    page = p.page
    page.click("#queue li >> nth=0")
    page.wait_for_selector("#editor[data-ready=true]")
    item_id = page.get_attribute("#editor", "data-item")
    page.click("#accept")  # a slip: the model was not correct
    page.wait_for_selector("#editor[data-last-correction]", state="attached")  # maybe closed: queue done
    cid = page.get_attribute("#editor", "data-last-correction")
    page.wait_for_function(f"() => !document.querySelector(\"#queue li[data-item='{item_id}']\")")
    entry = page.locator(f"#outcomes li[data-correction='{cid}']")
    page.once("dialog", lambda dialog: dialog.accept("slip: the model missed a gland"))
    entry.locator("button.withdraw").click()
    page.wait_for_function(
        f"() => document.querySelector(\"#outcomes li[data-correction='{cid}']\").textContent.includes('withdrawn')"
    )
    page.wait_for_selector(f"#queue li[data-item='{item_id}']")  # back in the queue, on the page too
    assert entry.locator("button.withdraw").count() == 0 and "not be trained on" in page.inner_text("#status")
    with server.client("viewer") as c:
        record = c.get(f"/v1/corrections/{cid}").json()
    assert record["withdrawn_reason"] == "slip: the model missed a gland" and record["withdrawn_at"]
    assert not p.problems, p.problems
    page.close()


def test_two_pathologists_never_have_the_same_patch_open(server, browser):
    from service.store import Store

    store = Store(server.data_dir)
    _, token = store.tokens.issue("dr.two", "annotator")
    with server.client("annotator") as c:  # earlier tests' pages were closed with a patch open: let go
        for item in c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"]:
            assert c.delete(f"/v1/queue/items/{item['id']}/claim").status_code == 204
    a, b = Page(browser, server, "annotator"), Page(browser, server, "annotator", token=token)
    b.page.wait_for_function("() => document.querySelectorAll('#queue li').length > 0")
    target = b.page.get_attribute("#queue li >> nth=0", "data-item")
    a.page.click(f"#queue li[data-item='{target}']")
    a.page.wait_for_selector(f"#editor[data-ready=true][data-item='{target}']")
    b.page.click(f"#queue li[data-item='{target}']")  # B's list is older than A's claim
    b.page.wait_for_function("() => document.getElementById('status').textContent.includes('has this patch open')")
    b.page.wait_for_function(f"() => !document.querySelector(\"#queue li[data-item='{target}']\")")
    assert b.page.get_attribute("#editor", "data-item") != target
    a.page.keyboard.press("Escape")  # A closes it: it is B's to take
    deadline = time.monotonic() + 10
    while store.queue.holder("cases/a.tif", target) and time.monotonic() < deadline:
        time.sleep(0.1)
    b.page.check("#queue-pooled")  # the list again
    b.page.click(f"#queue li[data-item='{target}']")
    b.page.wait_for_selector(f"#editor[data-ready=true][data-item='{target}']")
    assert store.queue.holder("cases/a.tif", target)[0] == "dr.two"
    assert not a.problems, a.problems
    assert all("409" in problem for problem in b.problems), b.problems  # the refused claim, logged by Chromium
    for p in (a, b):
        p.page.close()
    store.close()


def test_a_patch_of_another_slide_opens_from_the_pooled_queue(server, browser, source_slide):
    """Even while this slide's overlays are still loading: the old viewer goes without a broken image."""
    shutil.copy(source_slide, server.slide_root / "cases" / "b.tif")
    with server.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "cases/b.tif", "options": {"patch_um": 256, "queue_size": 4}})
        assert wait_job(c, r.json()["id"])["state"] == "succeeded"
    p = Page(browser, server, "annotator")
    page = p.page
    held = []  # a.tif's overlays, held back until b.tif is open: its viewer goes while they load

    def hold(route):
        if "a.tif" in page.url:
            held.append(route)
        else:
            route.continue_()

    page.route("**/overlays/*.png", hold)
    page.select_option("#slide-select", "cases/a.tif")
    page.wait_for_function("() => location.hash.includes('a.tif')")
    page.wait_for_selector("#viewer[data-ready=true]")
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert held, "a.tif's overlays were never asked for"
    page.check("#queue-pooled")
    there = page.locator("#queue li", has_text="cases/b.tif").first
    there.wait_for()
    item_id = there.get_attribute("data-item")
    there.click()
    page.wait_for_selector(f"#editor[data-ready=true][data-item='{item_id}']")
    assert page.input_value("#slide-select") == "cases/b.tif"
    for route in held:
        route.continue_()
    page.wait_for_selector("#viewer[data-layers='outline']")  # b.tif's own overlay
    page.wait_for_timeout(500)  # a.tif's overlays reach a viewer that is gone
    assert not p.problems, p.problems
    page.close()


def test_a_pathologist_signs_in_with_the_hospital_account(tmp_path, browser):
    """Authorization code with PKCE against an identity provider on loopback: the page is sent there,
    comes back with a code, trades it (with its verifier) for a JWT, and the API takes that JWT."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.oidc import IdentityProvider

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = "https://idp.hospital.test/realms/pathology"
    idp = IdentityProvider(key, issuer=issuer, client_id="uga-review", person="dr.house", roles=["pathologist"])
    idp.start()
    (tmp_path / "slides").mkdir()
    srv = Server(
        tmp_path / "data",
        tmp_path / "slides",
        name="oidc",
        UGA_OIDC_ISSUER=issuer,
        UGA_OIDC_AUDIENCE="uga-review",
        UGA_OIDC_JWKS_URL=idp.url,
        UGA_OIDC_ROLE_MAP="pathologist=annotator",
        UGA_OIDC_CLIENT_ID="uga-review",
        UGA_OIDC_AUTHORIZE_URL=idp.authorize_url,
        UGA_OIDC_TOKEN_URL=idp.token_url,
    )
    try:
        srv.start()
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
        page.goto(f"{srv.url}/review")
        page.click("#oidc-button")  # to the identity provider and back
        # null-safe: while the browser is on the identity provider's page there is no #who to read
        page.wait_for_function("() => document.getElementById('who')?.textContent.includes('oidc:dr.house')")
        assert page.inner_text("#who") == "oidc:dr.house · annotator"
        assert "code=" not in page.url and not page.is_visible("#sign-in")  # the code left the address bar
        # the API answered the JWT: the slide list (fetched after the user) comes back empty
        page.wait_for_function(
            "() => document.getElementById('status')?.textContent.includes('No segmented slides yet')"
        )
        assert not idp.refusals and not idp.codes and not problems, (idp.refusals, problems)
        page.close()
    finally:
        srv.stop()
        idp.stop()
