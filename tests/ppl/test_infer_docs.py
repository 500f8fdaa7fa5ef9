"""A user finds every backend's options where they look (issue 16): ``help(ppl.infer)`` lists each registered
backend's options with their defaults, read here against the backends' ``run`` signatures so the docstring
cannot drift; ``plan.options`` and ``plan.explain()`` list them for a compiled model."""
from __future__ import annotations

import ast
import inspect
import pydoc
import re

import pytest
import torch

import ppl
from ppl.backends import all_backends, backend_names, get_backend
from ppl.compiler import default_options
from tests.ppl import models_for_tests as M

NOT_OPTIONS = {"model", "args", "kwargs", "plan", "progress"}  # progress is ppl.infer's own argument


def documented_options(doc: str) -> dict[str, dict[str, object]]:
    """backend -> {option: default} from the "Backend options" section of a cleaned docstring: a line
    ``<backend> (...):`` (4 spaces in), then one ``name=default  words`` line per option (8 spaces in)."""
    section = doc.split("Backend options", 1)[1].split("\n\n", 1)[1]  # after the heading's paragraph
    out: dict[str, dict[str, object]] = {}
    current = None
    for line in section.splitlines():
        header = re.match(r"^ {4}(\w+) \(.*\):$", line)
        option = re.match(r"^ {8}(\w+)=(\S+)(\s|$)", line)
        if header:
            current = out.setdefault(header.group(1), {})
        elif option and current is not None:
            current[option.group(1)] = ast.literal_eval(option.group(2))
        elif line.strip() and not line.startswith(" " * 8):
            break  # the next paragraph
    return out


def signature_options(backend) -> dict[str, object]:
    """The options ``backend.run`` takes, with their defaults."""
    params = inspect.signature(backend.run).parameters.values()
    return {p.name: p.default for p in params
            if p.name not in NOT_OPTIONS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


DOCUMENTED = documented_options(inspect.getdoc(ppl.infer))


def test_the_docstring_parser_reads_every_listed_backend():
    assert set(DOCUMENTED) >= {"exact", "svae", "svi", "mcmc"}
    assert DOCUMENTED["exact"]["optimizer"] == "lbfgs" and DOCUMENTED["mcmc"]["warmup_steps"] is None


@pytest.mark.parametrize("name", backend_names())
def test_help_lists_every_option_of_every_backend_with_its_default(name):
    """Each registered backend has its section, with exactly the options its ``run`` takes and their defaults."""
    assert name in DOCUMENTED, f"help(ppl.infer) has no section for backend '{name}'"
    want = signature_options(get_backend(name))
    got = DOCUMENTED[name]
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, (f"backend '{name}': options missing from help(ppl.infer): {missing}; "
                                       f"documented but not taken: {extra}")
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k] or type(got[k]) is not type(want[k])}
    assert not wrong, f"backend '{name}': documented vs actual defaults {wrong}"


def test_no_section_for_a_backend_that_does_not_exist():
    assert set(DOCUMENTED) <= set(backend_names())


def test_help_shows_the_section():
    text = pydoc.render_doc(ppl.infer, renderer=pydoc.plaintext)
    for words in ("recognition=None", "init=None", "natgrad_step=0.5", "restarts=3", "warmup_steps=None",
                  "num_chains=", "optimizer='lbfgs'", "guide='normal'"):
        assert words in text


@pytest.mark.parametrize("backend", list(all_backends()), ids=lambda b: b.name)
def test_every_backend_has_options_with_defaults(backend):
    assert default_options(backend), f"backend '{backend.name}' declares no options: plan.options would be empty"


PLANNED = [("exact", M.hmm, (torch.randn(8),), {}), ("svi", M.hmm, (torch.randn(8),), {}),
           ("mcmc", M.normal_normal, (torch.randn(8),), {}), ("svae", M.neural_lds, (torch.randn(6, 3),), {}),
           ("vi", M.normal_normal, (torch.randn(8),), {})]


@pytest.mark.parametrize("name,model,args,kwargs", PLANNED, ids=[p[0] for p in PLANNED])
def test_plan_options_and_explain_list_the_backends_options(name, model, args, kwargs):
    plan = ppl.compile(model, *args, backend=name, **kwargs)
    options = dict(plan.options)
    assert options == signature_options(get_backend(name)) and options
    text = plan.explain()
    for key, value in options.items():
        assert f"{key}={value}" in text or f"{key}={value!r}" in text, f"explain() lacks {key}={value!r}"
