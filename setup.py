"""Package discovery only; metadata lives in pyproject.toml.

``ppl.models`` and ``ppl.inference`` live in the top-level folders ``models/`` and ``inference/``
(``package-dir`` in pyproject.toml). Their subpackages are found here, so a new backend folder under
``inference/`` needs no edit to the packaging files.
"""
from setuptools import find_packages, setup

ROOTS = {"ppl": "ppl", "ppl.models": "models", "ppl.inference": "inference"}


def _packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(set(found))


setup(packages=_packages())
