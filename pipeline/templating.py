"""The Jinja2 environment that the viewer page and the study report are rendered with (STYLE.md: HTML
and markdown come from templates), and the one way values are formatted for people (`fmt`)."""

import math

import jinja2

MISSING = "—"  # shown where a value is missing (None or NaN)


def fmt(value: object, digits: int = 3, *, fixed: bool = False) -> str:
    """A value for people: MISSING for None or NaN; a number with `digits` decimals when `fixed`, else a
    float to `digits` significant digits (e-notation from 1e4 up); anything else as str."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if fixed:
        return f"{value:.{digits}f}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def environment(package: str) -> jinja2.Environment:
    """Templates from `<package>/templates/`; `.html.j2` ones autoescaped; blocks trimmed so that a
    `{% ... %}` line leaves no blank line behind."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=jinja2.select_autoescape(["html.j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    return env
