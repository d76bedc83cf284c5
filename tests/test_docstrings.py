"""Every example in the library's docstrings runs and prints what it says (optax's convention)."""

import doctest
import importlib
import pkgutil

import pytest

import spam_optax

MODULES = sorted(m.name for m in pkgutil.iter_modules(spam_optax.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(f"spam_optax.{name}")
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
