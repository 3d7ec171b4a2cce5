"""The numbers the chapters' programs computed in this build, offered to the pages as MyST substitutions.

Each chapter program run by the book build writes `numbers.json` (a JSON object of strings, af::BookNumbers)
into its folder of the generated tree; `generated/NN_slug/numbers.json` becomes the substitutions
`{{ chNN_name }}`. The committed GPU results (kernels/results/*.json, read the same way) become
`{{ gpu_<file>_<name> }}`. A page that names a number nobody wrote fails the build (MyST's undefined-
substitution warning, and warnings are errors), so prose cannot quote a number the build did not produce.
"""

import json
import re
from pathlib import Path

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def _read(path: Path) -> dict:
    values = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of named numbers")
    for name, value in values.items():
        if not _NAME.match(name) or not isinstance(value, str):
            raise ValueError(f"{path}: '{name}' must be a lower-case name with a string value")
    return values


def _collect(app, config):
    substitutions = dict(config.myst_substitutions or {})
    source = Path(app.srcdir)
    for path in sorted((source / "generated").glob("*/numbers.json")):
        folder = path.parent.name
        match = re.match(r"(\d\d)_", folder)
        prefix = f"ch{match.group(1)}" if match else folder.replace("-", "_")
        for name, value in _read(path).items():
            substitutions[f"{prefix}_{name}"] = value
    results = source / "kernels_results"
    for path in sorted(results.glob("*.numbers.json")) if results.is_dir() else []:
        stem = path.name[: -len(".numbers.json")].replace("-", "_")
        for name, value in _read(path).items():
            substitutions[f"gpu_{stem}_{name}"] = value
    config.myst_substitutions = substitutions


def setup(app):
    app.connect("config-inited", _collect)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
