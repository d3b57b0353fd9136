"""The before/after report in a real headless Chromium (Debian's ``chromium``): it renders, every image
loads, nothing is fetched from the network, no console errors; a screenshot shows the thumbnails with their
relevant (green) / not relevant (red) outlines. The screenshot is kept under the test's tmp dir and, with
``KUBETUNE_KEEP_SCREENSHOTS=DIR``, copied there."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_sdk_models import tiny_local_run

pytestmark = pytest.mark.e2e


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def ensure_chromium() -> str:
    """Debian's chromium, installed on first use like the harness's other parts (root); a skip only where
    installing is impossible."""
    from tests.cluster.system import HarnessError, ensure_packages, is_root

    found = find_chromium()
    if found:
        return found
    if not is_root():
        pytest.skip("no chromium on PATH and not root to install it (apt-get install chromium)")
    try:
        ensure_packages(("chromium",))
    except HarnessError as err:
        pytest.fail(f"could not install Debian's chromium: {err}")
    found = find_chromium()
    assert found, "apt-get installed chromium but no chromium binary is on PATH"
    return found

PROBE = """<script>
window.__kt = {errors: [], requests: []};
window.addEventListener('error', function (e) {
  window.__kt.errors.push('error: ' + (e.message || (e.target && (e.target.src || e.target.tagName)) || '?'));
}, true);
var __ktConsoleError = console.error;
console.error = function () { window.__kt.errors.push('console.error: ' + Array.from(arguments).join(' '));
  __ktConsoleError.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var resources = performance.getEntriesByType('resource').map(function (r) { return r.name; })
      .filter(function (n) { return !n.startsWith('data:'); });
  var pre = document.createElement('pre');
  pre.id = 'kt-probe';
  pre.textContent = JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length,
    errors: window.__kt.errors, resources: resources,
    svgs: document.querySelectorAll('svg polyline').length,
    queries: document.querySelectorAll('div.q').length,
    metricRows: document.querySelectorAll('#metrics tr').length,
    overflow: document.documentElement.scrollWidth > window.innerWidth});
  document.body.appendChild(pre);
});
</script>"""


def chromium(*args: str, profile: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [ensure_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_chromium()
    import kubetune

    run = tiny_local_run(tmp_path_factory.mktemp("report-run"))
    return kubetune.write_report(run.output_dir, top_k=5)


def test_report_renders_in_chromium_with_all_images_and_no_errors(report: Path, tmp_path: Path) -> None:
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("<head>", "<head>" + PROBE, 1))
    out = chromium("--virtual-time-budget=10000", "--window-size=1200,900", "--dump-dom", probed.as_uri(),
                   profile=tmp_path / "profile")
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.search(r'<pre id="kt-probe">(.*?)</pre>', out.stdout, re.S)
    assert match, f"the page did not finish loading:\n{out.stdout[:2000]}\n{out.stderr[-2000:]}"
    import html

    probe: dict[str, Any] = json.loads(html.unescape(match.group(1)))
    assert probe["errors"] == [], probe
    assert probe["images"] == 6 * 2 * 5 and probe["broken"] == 0, probe
    assert probe["resources"] == [], f"the page fetched something: {probe['resources']}"
    assert probe["queries"] == 6 and probe["svgs"] >= 2 and probe["metricRows"] >= 10, probe
    assert not probe["overflow"], "the page is wider than a 1200px window"
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console


def test_report_screenshot(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    out = chromium("--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri(),
                   profile=tmp_path / "profile")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    import numpy as np

    pixels = np.asarray(image).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    assert len(colours) > 200, "the screenshot looks blank"
    green = int((pixels == (0x16, 0xA3, 0x4A)).all(axis=1).sum())  # relevant results' outline
    red = int((pixels == (0xF8, 0x71, 0x71)).all(axis=1).sum())  # not relevant
    assert green > 100 and red > 100, (green, red)
    keep = os.environ.get("KUBETUNE_KEEP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")
