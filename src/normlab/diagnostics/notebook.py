"""The notebook display of diagnostics: findings first, then the main plots, as one HTML fragment."""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

from normlab.diagnostics.findings import find_issues
from normlab.diagnostics.plots import plot_activation_distributions, plot_update_to_data
from normlab.diagnostics.storage import Diagnostics
from normlab.diagnostics.timeplots import plot_loss, plot_saturation


def findings_html(diagnostics: Diagnostics) -> str:
    """The findings as a list, worst first (or a line saying none fired)."""
    findings = find_issues(diagnostics)
    if not findings:
        return "<p>No rule fired: the recorded numbers look healthy.</p>"
    items = "".join(
        f"<li><b>{html.escape(f.severity.upper())} [{html.escape(f.rule)}]</b> {html.escape(f.message)} "
        f"<i>Remedy: {html.escape(f.remedy)}</i></li>"
        for f in findings
    )
    return f"<ul>{items}</ul>"


def diagnostics_html(diagnostics: Diagnostics) -> str:
    """What a notebook shows for ``diagnostics``: a summary line, the findings and the main plots (inline PNG)."""
    from normlab.diagnostics.report import embedded_image

    if diagnostics.is_empty:
        return "<p><b>normlab diagnostics</b>: nothing recorded yet.</p>"
    steps = diagnostics.steps()
    head = (
        f"<p><b>normlab diagnostics</b>: {len(steps)} recorded steps ({steps[0]}-{steps[-1]}), "
        f"{len(diagnostics.modules)} modules, {len(diagnostics.parameters)} parameters.</p>"
    )
    images = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        histogram_steps = diagnostics.histogram_steps_all()
        paths = [
            plot_loss(diagnostics, folder / "loss.png"),
            plot_activation_distributions(
                diagnostics, folder / "activations.png", histogram_steps[-1] if histogram_steps else None
            ),
            plot_update_to_data(diagnostics, folder / "update_to_data.png"),
            plot_saturation(diagnostics, folder / "saturation.png"),
        ]
        images = [embedded_image(path).replace("<img ", '<img style="max-width:100%" ') for path in paths if path]
    return f"<div>{head}{findings_html(diagnostics)}{''.join(images)}</div>"
