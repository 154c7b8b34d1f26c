"""The plan viewer page: one HTML file with its CSS, JavaScript and the plan inlined.

Inlining everything is what lets the page open from disk (browsers refuse ``fetch`` of a
``file://`` neighbour) and keeps it free of network access: no CDN, no font, no favicon
request. The plan goes in a ``<script type="application/json">`` element; ``<`` is escaped as
``\\u003c`` so no text in the plan (a source line, a path) can close that element.
"""

from __future__ import annotations

from importlib import resources

_MARKERS = ("/*STYLE*/", "/*SCRIPT*/", "/*PLAN*/")


def _asset(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def render_page(plan_json: str) -> str:
    """index.html for the plan whose plan.json text is ``plan_json``."""
    page = _asset("page.html")
    for marker in _MARKERS:
        if page.count(marker) != 1:
            raise RuntimeError(f"autoshard/viewer/page.html must hold {marker} exactly once; "
                               "reinstall autoshard")
    style, script = _asset("page.css"), _asset("page.js")
    head, rest = page.split("/*STYLE*/")
    middle, tail = rest.split("/*PLAN*/")
    before, after = tail.split("/*SCRIPT*/")
    return "".join([head, style, middle, plan_json.replace("<", "\\u003c"), before, script,
                    after])
