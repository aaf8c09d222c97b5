"""The README's Python examples run as written."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if code.lstrip().startswith("y = invfx.checkpoint(function"):
        pytest.skip("a signature sketch, not a program")
    namespace = {"__name__": f"readme_{index}"}
    if "invfx." in code and "import invfx" not in code:
        exec("import invfx\nimport torch", namespace)  # noqa: S102 - snippets that continue the quickstart
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"README.md block {index}", "exec"), namespace)  # noqa: S102 - our own README


def test_readme_has_examples():
    assert len(BLOCKS) >= 3
