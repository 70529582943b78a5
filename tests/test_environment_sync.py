"""pyproject.toml and environment.yml must list the same requirements with the same pins."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def _parse(req: str) -> tuple[str, str]:
    """Return (normalised name, normalised version specifier) of a requirement string."""
    m = _REQ.match(req)
    assert m, f"cannot parse requirement {req!r}"
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    spec = ",".join(sorted(p.strip() for p in m.group(3).replace(" ", "").split(",") if p.strip()))
    return name, spec


def _as_dict(reqs: list[str], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in reqs:
        name, spec = _parse(r)
        assert name not in out, f"{name} listed twice in {where}"
        out[name] = spec
    return out


def pyproject_requirements() -> dict[str, str]:
    """All requirements of pyproject.toml: dependencies plus every optional extra."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj = data["project"]
    reqs = list(proj.get("dependencies", []))
    for extra in proj.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return _as_dict(reqs, "pyproject.toml")


def environment_requirements() -> dict[str, str]:
    """The pip section of environment.yml (conda-level entries other than python/pip are included too)."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    reqs: list[str] = []
    for dep in env.get("dependencies", []):
        if isinstance(dep, dict):
            reqs.extend(dep.get("pip", []))
        elif isinstance(dep, str):
            name = re.split(r"[=<>!~ ]", dep, maxsplit=1)[0].lower()
            if name not in ("python", "pip"):
                reqs.append(dep)
    return _as_dict(reqs, "environment.yml")


def test_environment_yml_lists_python_and_pip():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    flat = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(d.startswith("python") for d in flat), "environment.yml must pin python"
    assert "pip" in flat, "environment.yml must list pip"


def test_requirements_in_sync():
    py, env = pyproject_requirements(), environment_requirements()
    problems = []
    for name in sorted(set(py) - set(env)):
        problems.append(f"{name}: in pyproject.toml but not in environment.yml")
    for name in sorted(set(env) - set(py)):
        problems.append(f"{name}: in environment.yml but not in pyproject.toml")
    for name in sorted(set(py) & set(env)):
        if py[name] != env[name]:
            problems.append(f"{name}: pin differs (pyproject.toml {py[name]!r}, environment.yml {env[name]!r})")
    assert not problems, "pyproject.toml and environment.yml disagree:\n  " + "\n  ".join(problems)


def test_torch_is_pinned():
    assert pyproject_requirements()["torch"].startswith("=="), "torch must stay pinned (CUDA wheels otherwise)"
