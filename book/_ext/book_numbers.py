"""The numbers the chapters' programs computed in this build, offered to the pages as MyST substitutions.

Each chapter program run by the book build writes `numbers.json` (a JSON object of strings, af::BookNumbers)
into its folder of the generated tree; `generated/NN_slug/numbers.json` becomes the substitutions
`{{ chNN_name }}`; a benchmark's `generated/<folder>/numbers.json` becomes `{{ <folder>_name }}`.

The GPU measurements are not rerun by the build; they are read from the committed result files, which record
the GPU, driver, CUDA version, date, commit and command of their run:
- a benchmark CSV `kernels/results/<stem>.csv` (one row per shape and implementation) gives, for each row
  that ran, `{{ <stem>_<shape>_<impl>_ms }}` (median), `_gbps` and `_pct` (of the read ceiling measured in
  the same run), and for each shape `{{ <stem>_<shape>_best_vs_peer }}` (the project's best version's time
  over the fastest peer's) and `{{ <stem>_<shape>_fastest_peer }}`; also `{{ <stem>_read_ceiling_gbps }}`,
  `{{ <stem>_gpu }}` and `{{ <stem>_date }}`;
- a GPU chapter's `results/output.txt` gives `{{ chNN_gpu_<version>_gbps }}`, `_ms` and `_speedup` (over the
  table's first row) from its timing table (the lines under a header starting with "version"),
  `{{ chNN_gpu_plan_<shape>_splits }}`, `_blocks` and `_keys_per_split` from a split plan's lines,
  `{{ chNN_gpu_<name>_ms }}` and `{{ chNN_gpu_<name>_<word>_gbps }}` from lines such as
  "dot over ...: median 0.738 ms, ..., 2908 GB/s read", and `{{ chNN_gpu }}` / `{{ chNN_gpu_date }}`;
- a chapter's committed `results/numbers.json` (a measurement the build cannot repeat, written by the script
  that made it) gives `{{ chNN_<name> }}`.

A page that names a number nobody wrote fails the build (MyST's undefined-substitution warning, and warnings
are errors), so prose cannot quote a number that neither the build nor a committed result produced.
"""

import csv
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
    chapters = source / "chapters"
    for path in sorted(chapters.glob("*/results/output.txt")):
        number = re.match(r"(\d\d)_", path.parent.parent.name)
        if number:
            substitutions.update(_gpu_chapter_numbers(path, f"ch{number.group(1)}"))
    # A committed measurement the build cannot repeat (chapter 16's speed against llama.cpp) is written by
    # its script as results/numbers.json beside the results it comes from, with the same provenance.
    for path in sorted(chapters.glob("*/results/numbers.json")):
        number = re.match(r"(\d\d)_", path.parent.parent.name)
        if number:
            for name, value in _read(path).items():
                key = f"ch{number.group(1)}_{name}"
                if key in substitutions:
                    raise ValueError(f"{path}: {key} is also written by the build")
                substitutions[key] = value
    for path in sorted(chapters.glob("*/kernels/results/*.csv")):
        substitutions.update(_benchmark_csv_numbers(path))
    config.myst_substitutions = substitutions


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _provenance(lines, prefix: str) -> dict:
    """`# gpu: NAME; driver: ...; date: YYYY-MM-DD...` (one line or several) -> {prefix}_gpu, {prefix}_gpu_date."""
    found = {}
    for line in lines:
        if not line.startswith("#"):
            continue
        for field in line[1:].split(";"):
            name, _, value = field.partition(":")
            name, value = name.strip(), value.strip()
            if name == "gpu" and value:
                found[f"{prefix}_gpu"] = value
            elif name == "date" and value:
                found[f"{prefix}_gpu_date"] = value[:10]
    return found


def _gpu_chapter_numbers(path: Path, prefix: str) -> dict:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = _provenance(lines, prefix)
    in_table = False
    first_ms = None
    row = re.compile(r"(\w+)\s+\d+\s+([\d.]+)\s+[\d.]+\s+(\d+)\s*\Z")
    plan = re.compile(r"([\w-]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+ MB\s*\Z")
    rate = re.compile(r"(\w+) over .*median ([\d.]+) ms.*?(\d+) GB/s (\w+)")
    for line in lines:
        if line.startswith("version"):
            in_table = True
            continue
        match = row.match(line) if in_table else None
        if match:
            version, ms = _key(match.group(1)), float(match.group(2))
            first_ms = first_ms or ms
            found[f"{prefix}_gpu_{version}_ms"] = match.group(2)
            found[f"{prefix}_gpu_{version}_gbps"] = match.group(3)
            found[f"{prefix}_gpu_{version}_speedup"] = f"{first_ms / ms:.1f}"  # over the table's first row
            continue
        in_table, first_ms = False, None
        match = plan.match(line)
        if match:
            shape = _key(match.group(1))
            found[f"{prefix}_gpu_plan_{shape}_blocks"] = match.group(2)
            found[f"{prefix}_gpu_plan_{shape}_splits"] = match.group(3)
            found[f"{prefix}_gpu_plan_{shape}_keys_per_split"] = match.group(4)
            continue
        match = rate.match(line)
        if match:
            found[f"{prefix}_gpu_{_key(match.group(1))}_ms"] = match.group(2)
            found[f"{prefix}_gpu_{_key(match.group(1))}_{_key(match.group(4))}_gbps"] = match.group(3)
    return found


def _benchmark_csv_numbers(path: Path) -> dict:
    stem = _key(path.stem)
    lines = path.read_text(encoding="utf-8").splitlines()
    found = {}
    for key, value in _provenance(lines, stem).items():
        found[key.replace(f"{stem}_gpu_date", f"{stem}_date")] = value
    rows = [r for r in csv.DictReader(line for line in lines if not line.startswith("#")) if r["status"] == "ok"]
    shapes = {}
    for r in rows:
        base = f"{stem}_{_key(r['shape'])}_{_key(r['impl'])}"
        found[f"{base}_ms"] = f"{float(r['ms_median']):.3f}"
        found[f"{base}_gbps"] = f"{float(r['gbps']):.0f}"
        found[f"{base}_pct"] = f"{float(r['pct_of_read_ceiling']):.0f}"
        found[f"{stem}_read_ceiling_gbps"] = f"{float(r['read_ceiling_gbps']):.0f}"
        shapes.setdefault(r["shape"], []).append(r)
    for shape, entries in shapes.items():
        best = [r for r in entries if r["impl"] == "best"]
        peers = [r for r in entries if r["source"] != "project"]
        if best and peers:
            fastest = min(peers, key=lambda r: float(r["ms_median"]))
            ratio = float(best[0]["ms_median"]) / float(fastest["ms_median"])
            found[f"{stem}_{_key(shape)}_best_vs_peer"] = f"{ratio:.3f}"
            found[f"{stem}_{_key(shape)}_fastest_peer"] = fastest["impl"]
    return found


def setup(app):
    app.connect("config-inited", _collect)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
