"""The dashboard's charts, drawn server-side by pygal as inline SVG.

Why pygal: it is pure Python (0.53 MB of source, no compiled parts, so
the Lambda package stays small and builds on any machine), renders SVG on the
server, so the charts show with JavaScript off and need no script under the
page's CSP (`script-src 'nonce-...'`; pygal's own tooltip script is turned off
with `js=[]`), and it escapes every label through its XML tree, so a
referrer named `<script>` is text. Its SVG carries a `<style>` element, which
the pages' `style-src 'unsafe-inline'` already allows. A vendored browser
library (uPlot, Chart.js) would need JavaScript to show anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

_COLORS = ("#336791", "#d9b64a", "#2f8f4e", "#a3261f", "#7a5ea8", "#5b6675", "#1f8fa3", "#c46a1b")


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    svg: Markup  # pygal's output: built from an XML tree, every label escaped


def _style():
    from pygal.style import Style

    return Style(
        background="#ffffff",
        plot_background="#ffffff",
        foreground="#1c2430",
        foreground_strong="#1c2430",
        foreground_subtle="#5b6675",
        colors=_COLORS,
        font_family="system-ui, -apple-system, 'Segoe UI', sans-serif",
        title_font_size=16,
        label_font_size=11,
        legend_font_size=12,
    )


def _counts(series: list[tuple[str, list[float]]]) -> dict[str, Any]:
    """Whole-number ticks for a chart of counts (pygal's own would say 0.2 databases)."""
    top = max([0, *(v for _, values in series for v in values)])
    step = max(1, math.ceil(top / 5))
    return {"y_labels": list(range(0, int(top) + step + 1, step)), "value_formatter": lambda v: f"{v:.0f}"}


def _render(kind: str, chart_id: str, title: str, labels: list[str], series: list[tuple[str, list[float]]], **options):
    import pygal

    options = {**_counts(series), **options}

    chart = getattr(pygal, kind)(
        style=_style(),
        width=520,
        height=300,
        js=[],  # no external script: the charts are plain SVG
        disable_xml_declaration=True,
        explicit_size=False,
        legend_at_bottom=True,
        print_values=False,
        show_legend=len(series) > 1,
        **options,
    )
    chart.title = title
    chart.x_labels = labels
    for name, values in series:
        chart.add(name, values)
    return Chart(chart_id, title, Markup(chart.render(is_unicode=True)))


def _percent(part: int, whole: int) -> float:
    return round(100 * part / whole, 1) if whole else 0.0


def charts(summary: dict[str, Any]) -> list[Chart]:
    """The four charts of the summary page (chalicelib.stats.summary's figures)."""
    statuses = list(summary["by_status"])
    hourly = summary["creates_per_hour"]
    hosts = summary["hosts"]
    refs = summary["top_referrers"]
    return [
        _render(
            "HorizontalBar",
            "status",
            "Databases by status",
            statuses,
            [("databases", [summary["by_status"][s] for s in statuses])],
        ),
        _render(
            "StackedBar",
            "creates",
            "Creates per hour (last 24 h, UTC)",
            [row["hour"].strftime("%H") for row in hourly],
            [("on demand", [row["on_demand"] for row in hourly]), ("from the pool", [row["pooled"] for row in hourly])],
            x_label_rotation=0,
        ),
        _render(
            "Bar",
            "hosts",
            "Pool level and host fill per host (%)",
            [h["id"] for h in hosts],
            [
                ("pool ready / target", [_percent(h["pool_ready"], h["pool_target"]) for h in hosts]),
                ("allocated / capacity", [h["fill_percent"] or 0 for h in hosts]),
            ],
            y_labels=[0, 25, 50, 75, 100],
            value_formatter=lambda v: f"{v:.0f} %",
        ),
        _render(
            "HorizontalBar",
            "referrers",
            "Top referrers (creates, 24 h)",
            [r["ref"] for r in refs],
            [("creates", [r["creates"] for r in refs])],
        ),
    ]
