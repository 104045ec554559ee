"""The Dagster UI, checked as a person would: webserver on 127.0.0.1 over the demo instance,
opened in headless Chromium. Screenshots land in $PSEUDOLABEL_UI_SCREENSHOTS (default: tmp)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHAIN = [
    "catalog_snapshot",
    "stratified_sample",
    "normalized_images",
    "detections",
    "masks",
    "pseudo_labels",
    "autosam2_manifest",
]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(demo_run):
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(demo_run.dagster_home),
        "PSEUDOLABEL_STORAGE": str(demo_run.data_root),
    }
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "dagster_webserver",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "workspace.yaml",
    ]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"webserver exited: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(1)
    else:
        proc.kill()
        raise TimeoutError("webserver did not start within 180 s")
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def page():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        yield page
        browser.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    target = os.environ.get("PSEUDOLABEL_UI_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    skip = page.get_by_role("button", name="Skip")  # first-visit community dialog
    if skip.count():
        skip.click()


def test_asset_graph_shows_every_asset_of_the_chain(webserver, page, screenshot_dir):
    open_page(page, f"{webserver}/asset-groups")
    page.get_by_text("catalog", exact=True).first.wait_for(timeout=60_000)  # a group node is drawn
    page.mouse.click(1000, 200)  # focus the graph canvas for its keyboard shortcut
    page.keyboard.press("Alt+e")  # "Expand all groups"
    for name in CHAIN:
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    page.screenshot(path=str(screenshot_dir / "ui-asset-graph.png"))
    assert (screenshot_dir / "ui-asset-graph.png").stat().st_size > 10_000


def test_partitions_page_lists_demo_shards(webserver, page, screenshot_dir, demo_run):
    open_page(page, f"{webserver}/assets/normalized_images?view=partitions")
    for shard in demo_run.shards:
        page.get_by_text(shard).first.wait_for(timeout=60_000)
    page.screenshot(path=str(screenshot_dir / "ui-partitions.png"))
