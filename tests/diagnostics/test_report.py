"""report.html: self-contained, complete, and every figure renders in headless Chromium."""

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from normlab.diagnostics import read_metrics, write_report

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


def _chromium() -> str | None:
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


@pytest.fixture(scope="module")
def report(run_dir):
    return write_report(run_dir)


def test_report_is_one_self_contained_file(report):
    page = report.read_text()
    assert report.name == "report.html"
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:)", page), "every resource must be inline"
    sources = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == 11
    assert all(base64.b64decode(source).startswith(b"\x89PNG\r\n\x1a\n") for source in sources)


def test_report_shows_config_losses_and_findings(report, run_dir):
    page = report.read_text()
    assert "tiny &lt;test&gt;" in page  # config values, escaped
    assert "3.3" in page and "final loss" in page  # the final event's test loss
    assert "Findings" in page and "Rules checked" in page
    assert "vocabulary of 27 symbols" in page
    assert f"{read_metrics(run_dir / 'metrics.jsonl')[-2]['train_loss']:.6g}" in page  # last logged step


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
    with pytest.raises(ValueError, match="line 2"):
        write_report(tmp_path)
