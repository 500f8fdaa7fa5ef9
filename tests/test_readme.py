"""The README's quick start runs as written (and says what it claims)."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_quick_start_runs_and_recovers_the_three_levels():
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(quick_start_code(), "README quick start", "exec"), namespace)
    assert "backend: exact" in out.getvalue()
    loc = sorted(float(v) for v in namespace["post"].mean("loc"))
    assert [round(v) for v in loc] == [-5, 0, 5]  # the three simulated levels, within 0.5
