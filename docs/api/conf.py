"""Sphinx configuration of the spam_optax API reference (``sphinx-build -W docs/api docs/api/_build``)."""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

project = "spam-optax"
author = "spam-optax contributors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
default_role = "py:obj"  # `spike_clip` in a docstring links to it
exclude_patterns = ["_build"]
html_theme = "alabaster"
