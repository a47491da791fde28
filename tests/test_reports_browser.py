"""The HTML reports in a real headless browser (Debian's chromium, installed by scripts/install-system-deps.sh).

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages
separated by NUL bytes on file descriptors 3 and 4), so no Python package beyond the standard
library is needed. For the subject and the cohort report: every <img> decodes with a non-zero
size, nothing is logged as an error (console, uncaught exception, failed load), the sortable table
sorts, and a screenshot goes to ``test-artifacts/`` for a person to look at. The subject report's
interactive viewer (NiiVue, WebGL2; headless chromium draws it with its software renderer) is
opened from file:// with the network switched off: its canvas shows an image, and toggling a
layer, scrolling a slice and flickering change what it shows.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from factories import REPO, REPORT_SESSIONS, REPORT_THRESHOLDS, report_outputs

from atlasflow.reports.cohort import write_cohort_report
from atlasflow.reports.subject import write_subject_report

CHROMIUM = Path(os.environ.get("ATLASFLOW_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1280,900",
    "--remote-debugging-pipe",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is absent: the browser test of the HTML reports needs Debian's chromium "
    "(`make system-deps` or `sudo scripts/install-system-deps.sh browser`)",
)


class Browser:
    """A headless chromium and one page, spoken to with DevTools-protocol commands."""

    def __init__(self, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser reads commands on fd 3 and writes replies on fd 4; bash puts our pipe ends there.
        command = shlex.join([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"])
        command += f" 3<&{to_browser_r} 4>&{from_browser_w}"
        # stderr to a file: a pipe nobody reads would block a chatty browser once it fills.
        self.stderr_path = profile / "chromium-stderr.txt"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                pass_fds=(to_browser_r, from_browser_w),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    stderr = self.stderr_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"chromium closed the DevTools pipe: {stderr}")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def open(self, path: Path, fragment: str = "") -> None:
        """Load the page afresh, even when the browser already shows it (with another fragment)."""
        # A navigation that changes only the fragment stays in the same document and fires no load
        # event: going through about:blank makes every open a full load.
        self.events.clear()
        self.send("Page.navigate", {"url": "about:blank"}, session=True)
        self.wait_for("Page.loadEventFired")
        self.events.clear()
        url = path.resolve().as_uri() + (f"#{fragment}" if fragment else "")
        self.send("Page.navigate", {"url": url}, session=True)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=True,
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Everything the page logged as an error since it was opened."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(
                    "console: "
                    + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                found.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def requests(self) -> list[str]:
        """The URLs the page asked for since it was opened."""
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def pixels(self, selector: str) -> np.ndarray:
        """What the element shows on screen, as an RGB array (a screenshot clipped to it)."""
        from PIL import Image as PILImage

        box = self.evaluate(
            f"(function(){{var e=document.querySelector({json.dumps(selector)});e.scrollIntoView();"
            "var r=e.getBoundingClientRect();return [r.x+window.scrollX,r.y+window.scrollY,r.width,r.height];})()"
        )
        clip = dict(zip(("x", "y", "width", "height"), box, strict=True), scale=1)
        data = self.send(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
            session=True,
        )["data"]
        return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def screenshot(self, path: Path, full_page: bool) -> None:
        params: dict = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
        data = self.send("Page.captureScreenshot", params, session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


IMAGES_JS = """
Promise.all(Array.from(document.images).map(function (img) {
  return img.decode().then(function () { return true; }, function () { return false; }).then(function (decoded) {
    return {alt: img.alt, decoded: decoded, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight};
  });
}))
"""


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    outdir, raw = report_outputs(root)
    reports = outdir / "reports"
    for s, sessions in REPORT_SESSIONS.items():
        raw_inputs = {t: str(raw[s]) for t in sessions} if s in raw else None
        write_subject_report(
            outdir,
            s,
            sessions,
            reports / f"sub-{s}.html",
            raw_inputs=raw_inputs,
            thresholds=REPORT_THRESHOLDS,
        )
    write_cohort_report(
        outdir,
        list(REPORT_SESSIONS),
        reports / "cohort.html",
        thresholds=REPORT_THRESHOLDS,
        sessions=REPORT_SESSIONS,
        iterations=2,
    )
    return reports


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    instance = Browser(profile)
    yield instance
    instance.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.parametrize("name, n_images", [("sub-03", 14), ("sub-02", 3), ("cohort", 4)])
def test_report_renders_in_chromium(browser, pages, name, n_images):
    browser.open(pages / f"{name}.html")
    images = browser.evaluate(IMAGES_JS)
    assert len(images) == n_images
    broken = [
        i
        for i in images
        if not (i["decoded"] and i["complete"] and i["width"] > 0 and i["height"] > 0)
    ]
    assert not broken, broken
    assert browser.errors() == []
    # The page is laid out: the first figure is visible and no wider than the window.
    box = browser.evaluate(
        "(function(){var r=document.images[0].getBoundingClientRect();return [r.width,r.height];})()"
    )
    assert 100 < box[0] <= 1280 and box[1] > 50
    browser.screenshot(ARTIFACTS / f"report-{name}.png", full_page=False)
    browser.screenshot(ARTIFACTS / f"report-{name}-full.png", full_page=True)
    assert (ARTIFACTS / f"report-{name}.png").read_bytes().startswith(b"\x89PNG")


def test_cohort_table_sorts_when_a_header_is_clicked(browser, pages):
    browser.open(pages / "cohort.html")
    subjects = "Array.from(document.querySelectorAll('#subject-table tbody tr td:first-child')).map(c => c.textContent)"
    assert browser.evaluate(subjects) == ["sub-04", "sub-02", "sub-01", "sub-03"]  # problems first
    browser.evaluate("document.querySelector('#subject-table th').click()")
    assert browser.evaluate(subjects) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    browser.evaluate("document.querySelector('#subject-table th').click()")
    assert browser.evaluate(subjects) == ["sub-04", "sub-03", "sub-02", "sub-01"]
    # Numeric column: NCC to atlas, ascending puts the failing 0.31 first, the subject without a value last.
    browser.evaluate("document.querySelectorAll('#subject-table th')[5].click()")
    assert browser.evaluate(subjects)[0] == "sub-02"
    assert browser.errors() == []


def test_missing_figure_placeholder_is_visible(browser, pages):
    browser.open(pages / "sub-02.html")
    shown = browser.evaluate("""(function () {
        var box = document.querySelector('[data-missing="sub-02_ses-1_jacobian"]');
        var r = box.getBoundingClientRect();
        return {text: box.textContent, width: r.width, height: r.height};
    })()""")
    assert "missing" in shown["text"] and "xfm.nii.gz not found" in shown["text"]
    assert shown["width"] > 200 and shown["height"] > 20


# ----------------------------------------------------------------------------- the viewer

WAIT_READY = """new Promise(function (resolve) {
  var t0 = Date.now();
  (function poll() {
    var state = document.getElementById('viewer-root').dataset.state;
    if (state === 'ready' || state === 'fallback' || Date.now() - t0 > %d) { resolve(state); }
    else { setTimeout(poll, 100); }
  })();
})"""


def wait_ready(browser, timeout_ms: int = 30000) -> str:
    # two frames after 'ready', so the canvas has been drawn and composited
    state = browser.evaluate(WAIT_READY % timeout_ms)
    browser.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return state


def changed(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels that differ visibly between two captures of one element."""
    return float((np.abs(a.astype(int) - b.astype(int)).max(axis=-1) > 24).mean())


@pytest.fixture()
def offline(browser):
    browser.send(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        session=True,
    )
    yield browser
    browser.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        session=True,
    )


def test_viewer_draws_toggles_scrolls_and_flickers_offline(offline, pages):
    browser = offline
    browser.open(pages / "sub-03.html")
    assert wait_ready(browser) == "ready"
    assert browser.evaluate("document.getElementById('viewer-root').dataset.scene") == "1/native"
    # only the page itself was loaded: library and volumes come from inside it
    assert {u.split(":", 1)[0] for u in browser.requests()} <= {"file", "data", "blob"}

    browser.evaluate(
        "document.getElementById('viewer-scene').value = '2/baseline'; "
        "document.getElementById('viewer-scene').dispatchEvent(new Event('change'))"
    )
    assert wait_ready(browser) == "ready"
    assert browser.evaluate("document.getElementById('viewer-root').dataset.scene") == "2/baseline"
    first = browser.pixels("#viewer-canvas")
    assert first.shape[0] > 300 and first.shape[1] > 600
    assert (first.max(axis=-1) > 40).mean() > 0.05, "the viewer's canvas is blank"
    browser.screenshot(ARTIFACTS / "viewer-sub-03-baseline.png", full_page=False)

    # toggling an overlay: hide the registered follow-up, the baseline shows through
    browser.evaluate(
        "var b = document.querySelector('#viewer-layers input[type=checkbox][data-key]:not([disabled])');"
        "b.click();"
    )
    wait_ready(browser)
    hidden = browser.pixels("#viewer-canvas")
    assert changed(first, hidden) > 0.002
    # the tumour layer: its checkbox turns its colour off
    toggled = browser.evaluate("""(function () {
        var rows = Array.from(document.querySelectorAll('#viewer-layers .viewer-layer'));
        var row = rows.find(r => /tumour ses-2/.test(r.textContent));
        row.querySelector('input[type=checkbox]').click();
        return row.querySelector('input[type=checkbox]').checked;
    })()""")
    assert toggled is False
    wait_ready(browser)
    no_tumour = browser.pixels("#viewer-canvas")
    assert changed(hidden, no_tumour) > 0.0005

    # scrolling a slice with the slider, then with the mouse wheel over a view
    browser.evaluate(
        "var s = document.getElementById('viewer-slice'); s.value = '300'; s.dispatchEvent(new Event('input'))"
    )
    wait_ready(browser)
    scrolled = browser.pixels("#viewer-canvas")
    assert changed(no_tumour, scrolled) > 0.01
    x, y = browser.evaluate(
        "(function(){var r=document.getElementById('viewer-canvas').getBoundingClientRect();"
        "return [r.x + r.width * 0.15, r.y + r.height * 0.5];})()"
    )
    for _ in range(3):
        browser.send(
            "Input.dispatchMouseEvent",
            {"type": "mouseWheel", "x": x, "y": y, "deltaX": 0, "deltaY": 120},
            session=True,
        )
    wait_ready(browser)
    wheeled = browser.pixels("#viewer-canvas")
    assert changed(scrolled, wheeled) > 0.005
    # values under the cursor, in the volumes' units
    browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y}, session=True)
    status = browser.evaluate("document.getElementById('viewer-location').textContent")
    assert (
        status.startswith("under cursor") and "log-Jacobian" in status and "tumour ses-1" in status
    )

    # flicker: the canvas alternates between the fixed image and the registered scan
    seen = flicker_frames(browser, 0)
    assert any("registered" in k for k in seen) and any("(fixed)" in k for k in seen)
    first_frame, second_frame = seen.values()
    assert changed(first_frame, second_frame) > 0.002
    browser.screenshot(ARTIFACTS / "viewer-sub-03-scrolled.png", full_page=False)
    assert browser.errors() == []


def flicker_frames(browser, index: int) -> dict[str, np.ndarray]:
    """Start the scene's ``index``-th flicker and capture the canvas in both of its states (a
    capture is kept only when the button's label, naming what is shown, is the same before and
    after it), then stop it: label -> pixels."""
    button = f"document.querySelectorAll('#viewer-flicker button')[{index}]"
    browser.evaluate(f"{button}.click()")
    label = f"{button}.textContent"
    seen: dict[str, np.ndarray] = {}
    for _ in range(20):
        before = browser.evaluate(label)
        frame = browser.pixels("#viewer-canvas")
        if browser.evaluate(label) == before:
            seen.setdefault(before, frame)
        if len(seen) == 2:
            break
        browser.evaluate(
            f"new Promise(r => {{ var t = setInterval(function () {{ if ({label} !== {json.dumps(before)}) {{ clearInterval(t); r(); }} }}, 20); }})"
        )
    browser.evaluate(f"{button}.click()")
    assert len(seen) == 2, list(seen)
    return seen


def show_scene(browser, scene: str) -> None:
    browser.evaluate(
        f"document.getElementById('viewer-scene').value = {json.dumps(scene)}; "
        "document.getElementById('viewer-scene').dispatchEvent(new Event('change'))"
    )
    assert wait_ready(browser) == "ready"
    assert browser.evaluate("document.getElementById('viewer-root').dataset.scene") == scene


def test_viewer_flickers_the_t1w_against_each_contrast(offline, pages):
    browser = offline
    browser.open(pages / "sub-03.html")
    assert wait_ready(browser) == "ready"
    # the session's scene: T1w (background) against the FLAIR on its grid
    show_scene(browser, "2/native")
    assert "FLAIR (on the T1w grid)" in browser.evaluate(
        "document.getElementById('viewer-layers').textContent"
    )
    seen = flicker_frames(browser, 0)
    assert set(seen) == {
        "showing: FLAIR (on the T1w grid) (stop)",
        "showing: ses-2 preprocessed (stop)",
    }
    assert changed(*seen.values()) > 0.01  # inverted contrast: most of the head changes
    # atlas space: the registered T1w against the FLAIR carried there (two overlays alternate)
    show_scene(browser, "2/atlas")
    buttons = (
        "Array.from(document.querySelectorAll('#viewer-flicker button')).map(b => b.textContent)"
    )
    labels = browser.evaluate(buttons)
    seen = flicker_frames(browser, labels.index("flicker registered T1w vs FLAIR"))
    assert set(seen) == {
        "showing: ses-2 FLAIR registered (stop)",
        "showing: ses-2 registered (stop)",
    }
    assert changed(*seen.values()) > 0.01
    # baseline space: the baseline's FLAIR against the follow-up's, and the FLAIR difference map
    show_scene(browser, "2/baseline")
    labels = browser.evaluate(buttons)
    assert "flicker ses-1 vs ses-2 FLAIR" in labels
    seen = flicker_frames(browser, labels.index("flicker ses-1 vs ses-2 FLAIR"))
    assert set(seen) == {"showing: ses-2 FLAIR registered (stop)", "showing: ses-1 FLAIR (stop)"}
    assert "FLAIR difference" in browser.evaluate(
        "document.getElementById('viewer-layers').textContent"
    )
    browser.screenshot(ARTIFACTS / "viewer-sub-03-flair.png", full_page=False)
    assert browser.errors() == []


def test_viewer_opens_at_the_scene_and_mark_a_link_names(browser, pages):
    browser.open(pages / "sub-02.html", fragment="view=1/atlas&mark=min-jacobian")
    assert wait_ready(browser) == "ready"
    assert browser.evaluate("document.getElementById('viewer-root').dataset.scene") == "1/atlas"
    # sub-02 has no warp to the atlas: no Jacobian to go to, the scene still opens and says what is missing
    notes = browser.evaluate("document.querySelector('#viewer-layers .note').textContent")
    assert "space-atlas_T1w.nii.gz not found" in notes
    assert (browser.pixels("#viewer-canvas").max(axis=-1) > 40).mean() > 0.05
    browser.screenshot(ARTIFACTS / "viewer-sub-02-atlas.png", full_page=False)
    assert browser.errors() == []
