"""Sphinx configuration of the book.

Run by the `book` target (book/CMakeLists.txt and book/render.cmake) with `-c book`: the source folder is
assembled in the build tree (build/book/src) from links to book/'s pages, to chapters/ and to the generated
files, and the Doxygen XML folder comes in as `-D breathe_projects.af=<build>/book/doxygen/xml`.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree

project = "Attention Forge"
author = "the Attention Forge authors"
copyright = author

extensions = [
    "myst_parser",
    "breathe",
    "sphinxcontrib.bibtex",
    "offline_mathjax",  # book/_ext: MathJax 2.7 copied from Debian, so that math renders with no network
    "book_numbers",  # book/_ext: the numbers the programs computed in this build, as {{ chNN_name }}
]

# The pages: the landing page, one opening page per part, the notation and the glossary, the API reference
# (one page per group of headers, book/api/) and one README per chapter. Other Markdown files in a chapter
# folder (notes, results) and the generated files are not pages of their own.
source_suffix = {".md": "markdown"}
include_patterns = ["index.md", "part[1-5].md", "notation.md", "glossary.md", "api/*.md", "chapters/*/README.md"]

# MyST: `$...$` and `$$...$$` math, amsmath environments, `:::` fences, definition lists, {attributes} and
# `{{ name }}` substitutions (filled by book/_ext/book_numbers.py).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline", "substitution"]
myst_heading_anchors = 3
# MyST would write a MathJax 3/4 configuration; the book configures MathJax 2.7 itself (offline_mathjax).
myst_update_mathjax = False

# The API reference: Breathe over the Doxygen XML of lib/include (and kernels/include).
breathe_projects = {}  # set on the command line, see the module docstring
breathe_default_project = "af"
breathe_domain_by_extension = {"hpp": "cpp", "h": "cpp", "cuh": "cpp"}
breathe_default_members = ("members",)
primary_domain = "cpp"

# Cross-references are checked: a page's {cpp:func}`af::...` (or {cpp:class}, {cpp:enumerator}) that names
# nothing in the API reference fails the build, as does a type in a documented declaration that resolves to
# nothing. Let through are only what has no entry here to link to: names from other libraries (the standard
# library, fmt, CLI11, nlohmann::json, the CUDA runtime), and the header files that Doxygen links in the
# comments, for which Breathe's `doxygenfile` writes no label.
nitpicky = True
nitpick_ignore_regex = [
    (r"cpp:.*", r"(std|fmt|CLI|nlohmann)(::.*)?"),
    (r"cpp:.*", r"cuda\w*_t"),
    (r"(std:)?ref", r"\w+_8(hpp|cuh|h)"),
]


# The API reference has one page per group of headers, each header rendered once by `doxygenfile`. Breathe
# declares the enclosing namespace (`af`, `af::kernels`) again on every header's page, which the C++ domain
# reports as a duplicate declaration; only those namespace declarations are let through, so that a real
# entity documented twice still fails the build.
class _NamespaceRedeclaration(logging.Filter):
    namespaces = {"af", "kernels", "af::kernels", "gguf", "af::gguf", "llama", "af::llama", "detail", "af::detail", "grad", "af::grad", "train", "af::train"}

    def filter(self, record):
        args = record.args if isinstance(record.args, tuple) else ()
        duplicate = isinstance(record.msg, str) and record.msg.startswith("Duplicate C++ declaration")
        return not (duplicate and len(args) == 4 and str(args[3]) in self.namespaces)


for _name in ("sphinx.sphinx.domains.cpp", "sphinx.sphinx.domains.cpp._symbol"):
    logging.getLogger(_name).addFilter(_NamespaceRedeclaration())

# One bibliography file for the whole book; each chapter lists the works it cites in its "Sources" section
# (a `bibliography` directive with `:filter: docname in docnames`). Citations read "Vaswani et al., 2017";
# the list labels them alphabetically ("VSP+17"), the same label for a work in every chapter.
bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "alpha"
bibtex_reference_style = "author_year"

suppress_warnings = [
    # Two chapters citing the same work each list it in their own bibliography, which sphinxcontrib-bibtex
    # reports as a duplicate; a citation still links to the entry on its own page (local entries first).
    "bibtex.duplicate_citation",
]

html_theme = "furo"
html_title = "Attention Forge"
html_copy_source = False
# The book is read from file://, where a page may not fetch another page (CORS): search lists the matching
# pages without the summaries it would fetch from them.
html_show_search_summary = False

# The book's own style sheet (book/_static/book.css): a wider text column for the programs' tables.
html_static_path = ["_static"]
html_css_files = ["book.css"]
