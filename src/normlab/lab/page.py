"""`index.html` of a lab run: every experiment's claim, verdict, checks and figures on one self-contained page
(figures embedded as base64 PNG, inline style, no scripts)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from normlab.diagnostics.report import embedded_image

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; }
.holds { color: #1b5e20; font-weight: bold; } .fails { color: #b71c1c; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
"""


def index_page(results: Sequence[Any], mode: str) -> str:
    """The HTML text of the page for `results` (`normlab.lab.runner.LabResult`s, figures already written)."""
    rows = "".join(
        f'<tr><td><a href="#{html.escape(r.name)}">{html.escape(r.name)}</a></td><td>{html.escape(r.title)}</td>'
        f"<td>{_verdict(r.verdict)}</td><td>{r.seconds:.1f} s</td></tr>" for r in results)
    sections = "".join(_section(result) for result in results)
    held = sum(result.verdict == "HOLDS" for result in results)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>normlab lab</title>'
            f"<style>{_STYLE}</style></head><body><h1>normlab lab ({html.escape(mode)} mode)</h1>"
            f"<p>{held} of {len(results)} claims hold.</p>"
            f"<table><tr><th>experiment</th><th>what</th><th>verdict</th><th>time</th></tr>{rows}</table>"
            f"{sections}</body></html>\n")


def _verdict(text: str) -> str:
    return f'<span class="{"holds" if text == "HOLDS" else "fails"}">{html.escape(text)}</span>'


def _section(result: Any) -> str:
    checks = "".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{html.escape(c.measured)}</td><td>{'yes' if c.passed else 'NO'}</td>"
        "</tr>" for c in result.checks)
    figures = "".join(embedded_image(path) for path in result.figures)
    name = html.escape(result.name)
    return (f'<h2 id="{name}">{name}: {html.escape(result.title)}</h2>'
            f"<p><b>Claim.</b> {html.escape(result.claim)}</p><p>Verdict: {_verdict(result.verdict)}</p>"
            f"<table><tr><th>check</th><th>measured</th><th>passed</th></tr>{checks}</table>{figures}"
            f'<p><a href="{name}/summary.md">{name}/summary.md</a> · <a href="{name}/result.json">result.json</a></p>')
