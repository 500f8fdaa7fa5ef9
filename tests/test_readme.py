"""The README works as written (issue 16, "a user finds the API").

- every ```python snippet runs, in order, in one namespace (a reader follows them one after the other), in a
  scratch folder (snippets may write files), and says what it claims: the quick start's plan and levels, the
  conditioned site kept by the predictive, the forecast's shape, a saved fit that loads with the same draws;
- every dotted ``ppl.`` path the README names resolves after ``import ppl`` exactly as written (it once said
  ``ppl.models.svae_gmm``, which raised AttributeError);
- every ``post.<name>`` and every ``Posterior`` member it lists exists, and ``ppl.infer``'s keywords it shows
  are ``ppl.infer``'s;
- every file it names exists, and every ``python -m <module>`` it shows is a module of the repository.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import ppl

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()


def python_snippets(text: str = TEXT) -> list[tuple[str, str]]:
    """(heading of the section it sits in, code) of every ```python block, in order."""
    out = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        out.append((headings[-1] if headings else "", match.group(1)))
    return out


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Run every snippet in order in one module namespace (registered in ``sys.modules``, so a model the README
    defines pickles by reference as it would from a user's module), in a scratch folder. Yields, keyed by section
    heading, a copy of the namespace after its snippet ran and the snippet's stdout; and the folder."""
    module = types.ModuleType("readme_snippets")
    sys.modules[module.__name__] = module
    folder = tmp_path_factory.mktemp("readme")
    outputs: dict[str, str] = {}
    after: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        torch.manual_seed(0)
        try:
            for heading, code in python_snippets():
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(code, f"README.md, section '{heading}'", "exec"), module.__dict__)
                outputs[heading] = outputs.get(heading, "") + out.getvalue()
                after[heading] = dict(module.__dict__)
            yield after, outputs, folder
        finally:
            del sys.modules[module.__name__]


def test_readme_names_the_two_commands():
    assert "make demo" in TEXT and "make test" in TEXT


def test_the_readme_has_python_snippets_beyond_the_quick_start():
    headings = [h for h, _ in python_snippets()]
    assert headings[0] == "Quick start" and len(headings) >= 3, headings


def test_quick_start_runs_and_recovers_the_three_levels(ran):
    after, outputs, _ = ran
    claimed = re.search(r'explain\(\)\)\s*# backend "(\w+)"', dict(python_snippets())["Quick start"]).group(1)
    assert f"backend: {claimed} " in outputs["Quick start"]  # the backend the README's comment names is the one chosen
    namespace = after["Quick start"]
    exact = ppl.compile(namespace["hmm"], namespace["y"], backend="exact")  # the comment's alternative: MAP globals
    assert exact.treatment("trans") == exact.treatment("loc") == "point estimate"
    loc = sorted(float(v) for v in namespace["post"].mean("loc"))
    assert [round(v) for v in loc] == [-5, 0, 5]  # the three simulated levels, within 0.5


def test_conditioning_keeps_the_fixed_site_and_forecasts_the_next_steps(ran):
    namespace = ran[0]["Conditioning, missing data, forecasting"]
    post, P = namespace["post"], namespace["P"]
    trans = post.predictive(3)["trans"]
    assert torch.equal(trans, P.expand(3, 3, 3))  # fixed by ppl.condition: kept, not redrawn from the prior
    forecast = namespace["forecast"]
    assert forecast.shape == (200, 20) and bool(torch.isfinite(forecast).all())
    assert abs(float(forecast[:, 0].mean()) - 5.0) < 1.0  # the series ends at level +5: the next step stays near


def test_a_saved_fit_loads_with_the_same_draws(ran):
    after, _, folder = ran
    section = after["Saving and resuming"]
    loaded = section["post"]
    assert (folder / "hmm_fit.pt").exists() and isinstance(loaded, ppl.Posterior)
    original = after["Conditioning, missing data, forecasting"]["post"]
    assert loaded is not original
    for key, value in original.sample(50, seed=3).items():
        assert torch.equal(loaded.sample(50, seed=3)[key], value)
    assert (folder / "hmm.ckpt").exists() and section["fit"].backend == "exact"   # the resumed fit


# ----------------------------------------------------------------------------- names the README uses
PPL_PATHS = sorted(set(re.findall(r"\bppl(?:\.[A-Za-z_]\w*)+", TEXT)))


@pytest.mark.parametrize("path", PPL_PATHS)
def test_every_ppl_path_resolves_as_written(path):
    """``import ppl`` then the attribute chain, as a reader types it (no ``from ... import`` needed)."""
    obj = ppl
    for part in path.split(".")[1:]:
        assert hasattr(obj, part), f"README names `{path}`, but `{part}` is not an attribute after import ppl"
        obj = getattr(obj, part)


def test_every_post_attribute_exists():
    names = set(re.findall(r"\bpost\.([A-Za-z_]\w*)", TEXT))
    fields = set(ppl.Posterior.__dataclass_fields__)
    missing = sorted(n for n in names if n not in fields and not hasattr(ppl.Posterior, n))
    assert names and not missing, f"README uses post.{missing}, which Posterior does not have"


def test_the_posterior_members_listed_exist_and_infer_takes_the_keywords_shown():
    paragraph = TEXT.split("returns a `Posterior`", 1)[1].split("It holds no closure", 1)[0]
    members = set(re.findall(r"`(\w+)(?:\([^`]*\))?`", paragraph)) - {"arviz", "sample_stats"}  # ArviZ's names
    fields = set(ppl.Posterior.__dataclass_fields__)
    missing = sorted(m for m in members if m not in fields and not hasattr(ppl.Posterior, m))
    assert len(members) >= 10 and not missing, missing
    signature = TEXT.split("`ppl.infer(model, *data, ", 1)[1].split("`", 1)[0]
    keywords = set(re.findall(r"(\w+)=", signature))
    params = set(inspect.signature(ppl.infer).parameters)
    assert keywords and keywords <= params, sorted(keywords - params)


FILES = sorted(set(re.findall(r"`([\w./-]+\.(?:py|md))`", TEXT)) | set(re.findall(r"\]\(([\w./-]+)\)", TEXT)))


@pytest.mark.parametrize("path", FILES)
def test_every_file_named_exists(path):
    assert (ROOT / path).exists(), f"README names {path}, which does not exist"


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python -m ([\w.]+)", TEXT))))
def test_every_python_m_module_exists(module):
    base = ROOT / module.replace(".", "/")
    assert base.with_suffix(".py").exists() or (base / "__main__.py").exists(), module


LIBRARY = sorted(set(re.findall(r"`models/(\w+)\.py`", TEXT.split("## Model library", 1)[1].split("\n## ", 1)[0])))


@pytest.mark.parametrize("name", LIBRARY)
def test_every_library_model_has_what_the_readme_says(name):
    """``ppl.models.<name>`` holds ``model``, ``simulate(seed)`` (its result's ``args`` go to ``ppl.infer``) and
    ``infer_options``; the HMM and the LDS take ``mask=``."""
    module = getattr(ppl.models, name)
    assert callable(module.model) and callable(module.infer_options)
    sim = module.simulate(seed=0)
    assert isinstance(sim.args, tuple) and isinstance(sim.kwargs, dict)
    if name in ("hmm", "lds"):
        assert "mask" in inspect.signature(module.model).parameters
