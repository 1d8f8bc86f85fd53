import math

from pipeline.templating import environment, fmt


def test_fmt_shows_missing_values_as_a_dash_and_numbers_by_digits():
    assert fmt(None) == fmt(math.nan) == "—"
    assert fmt(0.123456) == "0.123" and fmt(12345.6) == "1.235e+04" and fmt(3) == "3" and fmt("found") == "found"
    assert fmt(0.5, fixed=True) == "0.500" and fmt(2, 1, fixed=True) == "2.0"


def test_html_templates_are_escaped_and_markdown_ones_are_not():
    env = environment("analysis")
    assert env.autoescape("report.html.j2") and not env.autoescape("report.md.j2")
    assert env.from_string("{{ x|fmt(2) }}").render(x=1 / 3) == "0.33"
