"""The Dagster UI as a user sees it, in a real browser: the main job on the tiny config, then `make ui`'s
command (`python -m jobs.ui dagster`), opened in Debian's headless chromium driven by playwright.

It checks that the asset graph shows every group and that an asset's plot renders as an image: the
markdown metadata of its latest materialization (band_analysis: the band ratios; champions: recall and
perplexity against keep mass), opened from the asset page as a user would. Skipped, with the reason, when
playwright or chromium is missing or chromium does not start (`make browser` installs chromium as root).
Screenshots go to a temporary folder, or to $MEMKFAC_UI_SCREENSHOTS: the README's tour was made with
`MEMKFAC_UI_SCREENSHOTS=docs/images pytest tests/dagster/test_dagster_ui_browser.py`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.dagster.conftest import PROJECT, tiny_env
from tests.dagster.test_dagster_ui import serving

pytestmark = pytest.mark.slow

GROUPS = ("sources", "probes", "models", "kfac", "edits", "evaluation", "analysis", "resurgence", "reports")
# asset: (its metadata key holding the plot, the plot's image in the markdown)
PLOTS = {
    "band_analysis": ("band_ratios", 'img[alt="band ratios"]'),
    "champions": ("recall_vs_perplexity/", 'img[alt$="every variant"]'),
}
PIPELINE_S = 1200
UI_S = 120  # a page of the UI, from navigation to the element looked for
CHROMIUM_ARGS = [
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under playwright, with a fresh profile; skips saying why when there is none."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as e:
        pytest.skip(f"playwright is not installed ({e}); `pip install -e '.[dev]'`")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip(
            "no chromium on PATH; `make browser` installs Debian's as root (apt-get install chromium)"
        )
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=executable,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1280, "height": 800},
            )
        except Error as e:
            said = [line for line in str(e).splitlines() if "[err]" in line or "exitCode" in line]
            pytest.skip(f"{executable} did not start: {' '.join(said[-4:]) or str(e).splitlines()[0]}")
        yield context
        context.close()


@pytest.fixture(scope="module")
def dagster_ui(browser, tmp_path_factory):
    """The tiny pipeline run by the main job, then the Dagster UI on it; yields its base URL."""
    root = tmp_path_factory.mktemp("ui")
    env = {**os.environ, **tiny_env(root), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    main = subprocess.run(
        [sys.executable, "-m", "jobs.main"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=PIPELINE_S,
    )
    assert main.returncode == 0, main.stdout[-3000:] + main.stderr[-3000:]
    command = [sys.executable, "-m", "jobs.ui", "dagster", "--port"]  # what `make ui` runs
    with serving(lambda port: [*command, str(port)], env) as (port, _):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("MEMKFAC_UI_SCREENSHOTS")
    return Path(folder).resolve() if folder else tmp_path_factory.mktemp("screenshots")


def _open(browser, url: str):
    """A new page at ``url``, with Dagster's one-time community dialog dismissed whenever it shows."""
    page = browser.new_page()
    page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda skip: skip.click())
    page.goto(url, timeout=UI_S * 1000)
    return page


def _save(page, path: Path) -> None:
    """A screenshot as a small PNG (128 colours): the README's tour commits them."""
    from PIL import Image

    page.screenshot(path=path, animations="disabled")
    Image.open(path).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
        path, optimize=True
    )


def test_the_asset_graph_shows_every_group(browser, dagster_ui, shots):
    page = _open(browser, f"{dagster_ui}/asset-groups")
    graph = page.locator("svg")  # the lineage graph (the tree beside it lists the groups too)
    for group in GROUPS:
        graph.get_by_text(group, exact=True).wait_for(state="visible", timeout=UI_S * 1000)
    _save(page, shots / "dagster-asset-graph.png")
    page.close()


def test_the_runs_page_lists_the_main_jobs_runs(browser, dagster_ui, shots):
    """`make ui` reads the main job's instance: its runs, tagged with its process, are there and succeeded."""
    page = _open(browser, f"{dagster_ui}/runs")
    page.get_by_text("memkfac/main_job_process").first.wait_for(state="visible", timeout=UI_S * 1000)
    assert page.get_by_text("Success", exact=True).count() > 0  # run status tags
    assert page.get_by_text("Failure", exact=True).count() == 0
    _save(page, shots / "dagster-runs.png")
    page.close()


@pytest.mark.parametrize("asset", sorted(PLOTS))
def test_an_asset_page_renders_its_plot(browser, dagster_ui, shots, asset):
    key, image = PLOTS[asset]
    page = _open(browser, f"{dagster_ui}/assets/{asset}")
    row = page.locator("tr", has_text=key).last  # the metadata table of the latest materialization
    row.get_by_text("Show Markdown").click(timeout=UI_S * 1000)
    plot = page.locator(image).first
    plot.wait_for(state="visible", timeout=UI_S * 1000)
    page.wait_for_function("img => img.complete", arg=plot.element_handle(), timeout=UI_S * 1000)
    assert plot.evaluate("img => img.naturalWidth") > 0
    _save(page, shots / f"dagster-{asset}.png")
    page.close()
