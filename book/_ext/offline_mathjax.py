"""Math with no network: MathJax 2.7 from Debian's libjs-mathjax, served from the book's own _static folder.

Sets Sphinx's MathJax options to the TeX-AMS_CHTML combined configuration (one file holding the core TeX
input, the CommonHTML output and the common extensions) and copies into <html>/_static/mathjax/ only what
that configuration needs besides: MathJax.js, the modules it loads on demand (CommonHTML parts and font
data, operator tables, TeX extensions such as \color or \cancel, the menu's help), the TeX web fonts and
the English messages. fonts-mathjax may install the fonts as symbolic links; the copies are plain files.
The copy is incremental (unchanged files are skipped), so a second build is quick.
"""

import shutil
from pathlib import Path

from sphinx.errors import ExtensionError

# Relative to the MathJax root; every pattern must match at least one file.
PARTS = (
    "MathJax.js",
    "config/TeX-AMS_CHTML.js",
    "jax/output/CommonHTML/**/*.js",
    "jax/element/mml/**/*.js",
    "extensions/*.js",
    "extensions/TeX/*.js",
    "fonts/HTML-CSS/TeX/woff/*.woff",
    "localization/en/*.js",
)

# MathJax 2 configuration (Sphinx writes it as MathJax.Hub.Config). Sphinx puts inline math in \(...\) and
# display math in \[...\] inside elements of class "math"; tex2jax finds those delimiters. A TeX error or an
# undefined macro is shown as a MathJax error box (noErrors/noUndefined off), which the browser check catches.
MATHJAX2_CONFIG = {
    "tex2jax": {
        "inlineMath": [["\\(", "\\)"]],
        "displayMath": [["\\[", "\\]"]],
        "processEscapes": False,
        "processEnvironments": False,
    },
    "TeX": {"noErrors": {"disabled": True}, "noUndefined": {"disabled": True}},
    "CommonHTML": {"linebreaks": {"automatic": False}},
    "messageStyle": "none",
}


def configure(app, config):
    config.mathjax_path = "mathjax/MathJax.js?config=TeX-AMS_CHTML"
    config.mathjax2_config = MATHJAX2_CONFIG
    source = Path(config.offline_mathjax_source)
    missing = [part for part in PARTS if not any(source.glob(part))]
    if missing:
        raise ExtensionError(
            f"MathJax 2.7 is incomplete in {source} (no {', '.join(missing)}): "
            "install libjs-mathjax and fonts-mathjax (run scripts/install_deps.sh)"
        )


def copy_mathjax(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    source = Path(app.config.offline_mathjax_source)
    target = Path(app.outdir) / "_static" / "mathjax"
    for part in PARTS:
        for file in source.glob(part):
            copy = target / file.relative_to(source)
            original = file.stat()  # follows a symbolic link to the real font file
            if copy.is_file() and copy.stat().st_size == original.st_size and copy.stat().st_mtime >= original.st_mtime:
                continue
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, copy)


def setup(app):
    app.add_config_value("offline_mathjax_source", "/usr/share/javascript/mathjax", "html", types=frozenset({str}))
    app.connect("config-inited", configure)
    app.connect("build-finished", copy_mathjax)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
