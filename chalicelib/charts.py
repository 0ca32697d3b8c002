"""Small bar charts of a database's usage over time, as inline SVG (the claim page, issue 18 §4).

Server-rendered, no script and nothing fetched, so the pages' CSP
(default-src 'none') needs no change. Each bar has a <title> (a tooltip, and
what a screen reader reads) and the chart an aria-label with its maximum.
"""

from __future__ import annotations

from html import escape
from typing import Any

_WIDTH, _HEIGHT, _GAP = 300, 60, 2


def human_bytes(n: int | float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{int(n)} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _value(day: dict[str, Any], metric: str) -> int | None:
    if metric == "transfer":
        return int(day.get("transfer_in_bytes") or 0) + int(day.get("transfer_out_bytes") or 0)
    value = day.get(metric)
    return int(value) if value is not None else None


def bars(days: list[dict[str, Any]], metric: str, label: str, element_id: str) -> str:
    """One chart: a bar per day of `metric` ("size_bytes", "connections_peak" or "transfer")."""
    values = [_value(day, metric) for day in days]
    top = max((v for v in values if v is not None), default=0)
    shown = (lambda v: str(v)) if metric == "connections_peak" else human_bytes
    width = _WIDTH / max(len(days), 1)
    rects = []
    for i, (day, value) in enumerate(zip(days, values, strict=True)):
        height = 0.0 if not value or not top else max(1.0, _HEIGHT * value / top)
        text = f"{day['day']}: {shown(value) if value is not None else 'not measured'}"
        rects.append(
            f'<rect x="{i * width:.1f}" y="{_HEIGHT - height:.1f}" width="{max(width - _GAP, 1):.1f}" '
            f'height="{height:.1f}" fill="#336791"><title>{escape(text)}</title></rect>'
        )
    summary = f"{label}, last {len(days)} days; highest {shown(top)}"
    return (
        f'<figure class="chart"><figcaption>{escape(label)} <span class="muted">(max {escape(shown(top))})</span>'
        f'</figcaption><svg id="{escape(element_id)}" role="img" aria-label="{escape(summary)}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" width="100%" height="{_HEIGHT}" preserveAspectRatio="none">'
        f'<rect x="0" y="{_HEIGHT - 1}" width="{_WIDTH}" height="1" fill="#dde3ea"></rect>{"".join(rects)}</svg>'
        "</figure>"
    )
