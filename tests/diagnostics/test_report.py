"""report.html: self-contained, complete, every figure renders and the step slider works in headless Chromium."""

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from normlab.diagnostics import load_diagnostics, write_report
from normlab.errors import CheckpointError
from normlab.runs.metrics import read_metrics

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# appended to a copy of the report: marks each image with its decoded width once the page has loaded
PROBE = """<script>window.addEventListener("load", () => {
  for (const image of document.images) image.setAttribute("data-natural-width", image.naturalWidth);
  document.body.setAttribute("data-checked", document.images.length);
});</script>"""


# appended to a copy of the report: notes what the explorer shows, moves the slider to the last step, notes again
SLIDER_PROBE = """<script>window.addEventListener("load", () => {
  const slider = document.getElementById("explorer-slider");
  const shown = () => document.getElementById("explorer-step").textContent + "|" +
    document.querySelector("#explorer-grid polyline").getAttribute("points");
  document.body.setAttribute("data-before", shown());
  slider.value = slider.max;
  slider.dispatchEvent(new Event("input"));
  document.body.setAttribute("data-after", shown());
  document.body.setAttribute("data-charts", document.querySelectorAll("#explorer-grid .chart").length);
});</script>"""


def _chromium() -> str | None:
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


@pytest.fixture(scope="module")
def report(run_dir):
    return write_report(run_dir)


def test_report_is_one_self_contained_file(report):
    page = report.read_text()
    assert report.name == "report.html"
    assert "<link" not in page and "@import" not in page and "http" not in page.replace("http-equiv", "")
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:)", page), "every resource must be inline"
    assert not re.search(r"<script[^>]*\ssrc", page), "scripts are inline"
    sources = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == 11
    assert all(base64.b64decode(source).startswith(b"\x89PNG\r\n\x1a\n") for source in sources)


def test_report_shows_config_losses_and_findings(report, run_dir):
    page = report.read_text()
    assert "tiny &lt;test&gt;" in page  # config values, escaped
    assert re.search(r"<td>layers</td><td[^>]*>32, 27</td>", page)  # key/value rows, not JSON blobs
    assert page.index("<h2>Loss</h2>") < page.index("<h2>Findings</h2>") < page.index("<h2>Configuration</h2>")
    assert page.index('alt="loss"') < page.index("<h2>Findings</h2>")  # the loss curve comes first
    assert "3.3" in page and "final loss" in page  # the final event's test loss
    assert "Findings" in page and "Rules checked" in page
    assert "vocabulary of 27 symbols" in page
    assert f"{read_metrics(run_dir)[-2]['train_loss']:.6g}" in page  # last logged step


def test_every_figure_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install -y chromium); cannot render report.html"
        )
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'data-checked="11"' in result.stdout, "the page did not finish loading with 11 images"
    widths = [int(width) for width in re.findall(r'data-natural-width="(\d+)"', result.stdout)]
    assert len(widths) == 11 and all(width > 0 for width in widths), widths


def test_the_explorer_holds_every_histogram_step(report, run_dir):
    page = report.read_text()
    payload = re.search(r'<script type="application/json" id="histogram-data">(.*?)</script>', page).group(1)
    data = json.loads(html.unescape(payload))
    assert data["steps"] == [0, 3, 6, 7]
    tanh = next(s for s in data["series"] if s["layer"] == "4" and s["kind"] == "act")
    diagnostics = load_diagnostics(run_dir)
    for index, step in enumerate(data["steps"]):
        histogram = diagnostics.histogram("4", "act", step)
        assert tanh["histograms"][index] == [histogram.lo, histogram.hi, histogram.counts.tolist()]


def test_the_step_slider_changes_what_is_shown_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); cannot run the slider")
    probe = tmp_path / "slider.html"
    probe.write_text(report.read_text().replace("</body>", SLIDER_PROBE + "</body>"))
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    before = re.search(r'data-before="([^"]*)"', result.stdout).group(1)
    after = re.search(r'data-after="([^"]*)"', result.stdout).group(1)
    assert before.startswith("step 0|") and after.startswith("step 7|")
    assert before.split("|")[1] != after.split("|")[1]  # the chart itself changed
    assert int(re.search(r'data-charts="(\d+)"', result.stdout).group(1)) >= 5  # one per recorded module


def test_a_run_without_diagnostics_or_config_still_gets_a_report(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "train_loss": 3.3}\n{"step": 1, "train_loss": 3.2}\n'
    )
    page = write_report(tmp_path).read_text()
    assert "No diagnostics were recorded" in page and "No config.json" in page
    assert page.count("<img ") == 1  # the loss curve


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(CheckpointError, match="line 2 is not valid JSON"):
        write_report(tmp_path)
