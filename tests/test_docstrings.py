"""Every example in the docstrings of spam_optax and models runs and prints what it says (optax's
convention), and the API reference lists every public name."""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import models
import spam_optax

MODULES = [f"{pkg.__name__}.{m.name}" for pkg in (spam_optax, models)
           for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_api_reference_lists_every_public_name():
  index = (Path(__file__).resolve().parents[1] / "docs" / "api" / "index.rst").read_text()
  missing = [n for n in spam_optax.__all__ if f"spam_optax.{n}\n" not in index]
  assert not missing, f"add these to docs/api/index.rst: {missing}"
