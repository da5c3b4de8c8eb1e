"""The README's API example runs (at smaller shapes) and prints numbers that show the call did
something: every nonzero metric prints as nonzero (the KL is ~5e-5; rounded to 4 places it read 0)."""
import ast
import contextlib
import io
import math
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    text = README.read_text()
    section = text[text.index("\n## API\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_prints_what_the_call_did():
    code = api_example()
    shapes = "B, T, D, V = 8, 128, 1024, 32000"
    assert shapes in code
    scope = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace(shapes, "B, T, D, V = 8, 16, 64, 515"), str(README), "exec"), scope)
    first, second = out.getvalue().splitlines()
    printed = ast.literal_eval(first[first.index("{"):])
    assert set(printed) == set(scope["metrics"])
    for name, value in scope["metrics"].items():
        shown = float(printed[name])
        assert (shown != 0) == (value.item() != 0), (name, printed[name], value.item())
        assert math.isclose(shown, value.item(), rel_tol=1e-3, abs_tol=0.0), (name, printed[name], value.item())
    assert float(printed["kl"]) > 0
    assert float(first.split()[1]) == float(f"{scope['loss'].item():.4e}")
    norms = [float(x.rstrip(",")) for x in second.split()[3::2]]
    assert norms == [float(f"{scope[n].grad.norm():.3e}") for n in ("hidden", "weight")] and min(norms) > 0
    assert isinstance(scope["loss"], torch.Tensor)
