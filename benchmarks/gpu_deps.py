"""The GPU check's first step: the installed packages against pyproject.toml's pins, and what to carry.

A lent GPU machine has its own torch/transformers and may lack polars or webdataset, and nothing can be fetched
there: each missing or different pin is listed with the wheel it needs and that wheel's size, and with
`--wheels DIR` those found in DIR are installed (`pip install --no-index --no-deps --target OUT/site`, which the
later steps put first on PYTHONPATH). Sizes: the cp312 manylinux x86-64 wheels `pip download` gave on 2026-12-07.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT_MB = 64 * 1.048576  # the lent machine takes 64 MiB of carried files, the repository included
# wheel sizes in MB; None: not carryable in practice (the CUDA torch wheel and its nvidia-* wheels are GBs)
WHEEL_MB = {
    "torch": None,
    "transformers": 13.5,
    "tokenizers": 3.4,
    "safetensors": 0.5,
    "peft": 0.8,
    "accelerate": 0.4,
    "decord": 13.6,
    "av": 35.8,
    "webdataset": 0.07,
    "braceexpand": 0.006,
    "pyarrow": 55.0,
    "polars": 0.9,
    "polars-runtime-32": 53.9,
    "numpy": 16.6,
    "pillow": 7.1,
    "typer": 0.1,
    "rich": 0.3,
    "nltk": 1.7,
    "sentence-transformers": 0.8,
    "scipy": 35.2,
    "pycocoevalcap": 104.3,
    "pycocotools": 0.4,
}
# wheels a pin cannot be installed without (its Requires-Dist) that the lent image may lack; "pin": the pin's version
EXTRA_WHEELS = {
    "polars": (("polars-runtime-32", "pin"),),
    "webdataset": (("braceexpand", "0.1.7"),),
    "pycocoevalcap": (("pycocotools", "2.0.11"),),
}
# what each pin is for in the check; a missing `stand_in` pin is replaced (reported), an `unused` one is not needed
USE = {
    "torch": "everything",
    "transformers": "everything",
    "tokenizers": "everything",
    "safetensors": "checkpoints",
    "peft": "LoRA training and eval",
    "accelerate": "transformers' loading",
    "webdataset": "shards",
    "pyarrow": "frames files, labels",
    "polars": "dst prepare (labels summary)",
    "numpy": "everything",
    "pillow": "frame decoding",
    "typer": "the CLI",
    "rich": "the CLI",
    "scipy": "eval metrics",
    "sentence-transformers": "eval scoring",
    "pycocoevalcap": "stand_in",
    "decord": "unused",
    "av": "unused",
    "nltk": "unused",
}
STAND_INS = {
    "pycocoevalcap": "BLEU/CIDEr stand-in returning 0 (its 104 MB wheel is over the 64 MiB carry limit); "
    "streaming rates are unaffected, text scores are not ProAssist's"
}


def pins(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{normalised name: version} of [project].dependencies (exact `==` pins only)."""
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    found = {}
    for dep in deps:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*", dep)
        if match is None:
            raise ValueError(f"{pyproject}: dependency {dep!r} is not an exact pin (name==version)")
        found[normalise(match.group(1))] = match.group(2)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str, paths: list[str]) -> str | None:
    for dist in importlib.metadata.distributions(path=paths):
        if normalise(dist.metadata["Name"] or "") == name:
            return dist.version
    return None


def local_version_free(version: str) -> str:
    return version.split("+")[0]  # torch 2.13.0+cu130 satisfies the pin 2.13.0


def survey(paths: list[str], wheels: Path | None) -> list[dict]:
    rows = []
    for name, want in pins().items():
        have = installed(name, paths)
        state = "missing" if have is None else "ok" if local_version_free(have) == want else "different"
        row = {"package": name, "pinned": want, "installed": have, "state": state, "for": USE.get(name, "")}
        if state != "ok":
            needed = [(name, want)] + [
                (extra, want if version == "pin" else version)
                for extra, version in EXTRA_WHEELS.get(name, ())
                if installed(extra, paths) is None
            ]
            row["wheels"] = [f"{n}=={v}" for n, v in needed]
            sizes = [WHEEL_MB.get(n) for n, _ in needed]
            row["wheel_mb"] = None if None in sizes else round(sum(sizes), 1)
            row["in_wheels_dir"] = bool(wheels) and all(_find_wheel(wheels, n, v) for n, v in needed)
        rows.append(row)
    return rows


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    stem = re.sub(r"[-.]+", "_", name).lower()
    for path in sorted(folder.glob("*.whl")):
        parts = path.name.split("-")
        if parts[0].lower() == stem and parts[1] == version:
            return path
    return None


class InstallError(RuntimeError):
    """pip could not install the wheels given."""


def install(wheels: Path, rows: list[dict], target: Path, timeout: float) -> tuple[list[str], str]:
    """pip install the wheels DIR holds for the rows that need them; (installed wheel files, pip's output tail)."""
    files = []
    for row in rows:
        if row["state"] != "ok" and row.get("in_wheels_dir"):
            for spec in row["wheels"]:
                name, _, version = spec.partition("==")
                files.append(str(_find_wheel(wheels, name, version)))
    if not files:
        return [], ""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(target),
            *dict.fromkeys(files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = (proc.stdout + proc.stderr).strip()[-600:]
    if proc.returncode:
        raise InstallError(f"pip install from {wheels} failed (exit {proc.returncode}): {tail}")
    return files, tail


def check(out: Path, wheels: Path | None, timeout: float = 300) -> dict:
    """The deps step: survey, install from `wheels` if given, survey again. Returns the report; `site` is the
    folder the later steps must put first on PYTHONPATH (None when nothing was installed)."""
    site = out / "site"
    paths = [str(site), *sys.path]
    rows = survey(paths, wheels)
    installed_files, pip_tail = install(wheels, rows, site, timeout) if wheels else ([], "")
    if installed_files:
        importlib.invalidate_caches()
        rows = survey(paths, wheels)
    needed = [r for r in rows if r["state"] != "ok" and r["for"] not in ("unused", "stand_in")]
    sizes = [r["wheel_mb"] for r in needed if r["state"] == "missing"]
    blocking = [r["package"] for r in needed if r["state"] == "missing"]
    return {
        "python": sys.version.split()[0],
        "packages": rows,
        "installed_from_wheels": installed_files,
        "pip_output": pip_tail,
        "site": str(site) if installed_files else None,
        "missing_needed": blocking,
        "different": [r["package"] for r in rows if r["state"] == "different"],
        "stand_ins": {
            name: STAND_INS[name]
            for name in STAND_INS
            if any(r["package"] == name and r["state"] == "missing" for r in rows)
        },
        "carry_mb_for_missing": None if None in sizes else round(sum(sizes), 1),
        "carry_limit_mb": round(CARRY_LIMIT_MB, 1),
    }


def lines(report: dict) -> list[str]:
    """Human-readable lines for the console and the markdown report."""
    out = [f"python {report['python']}"]
    for r in report["packages"]:
        if r["state"] == "ok":
            continue
        size = f"{r['wheel_mb']} MB" if r.get("wheel_mb") is not None else "too large to carry"
        out.append(
            f"{r['package']}: pinned {r['pinned']}, installed {r['installed'] or 'none'} ({r['state']}; "
            f"for {r['for']}); wheel {' + '.join(r['wheels'])}: {size}"
            + ("; in --wheels" if r.get("in_wheels_dir") else "")
        )
    if report["carry_mb_for_missing"] is not None and report["missing_needed"]:
        out.append(
            f"carrying the missing wheels: {report['carry_mb_for_missing']} MB of the "
            f"{report['carry_limit_mb']} MB limit (the repository and tokenizer come on top)"
        )
    out += [f"stand-in for {name}: {why}" for name, why in report["stand_ins"].items()]
    return out
