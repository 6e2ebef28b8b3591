"""Sphinx configuration: the docs are Markdown (MyST); their code is included from the example DAGs."""

from __future__ import annotations

project = "airflow-provider-stripe-meter"
author = "airflow-provider-stripe-meter contributors"
copyright = "2026, " + author
extensions = ["myst_parser", "sphinx.ext.autodoc"]
# The reference shows each parameter's default in the signature, and the docstring's text.
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autoclass_content = "both"
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
# Links to a section of another page: #anchors for headings up to level 3.
myst_heading_anchors = 3
html_theme = "alabaster"
