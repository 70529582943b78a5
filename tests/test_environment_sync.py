"""pyproject.toml and environment.yml must list the same requirements with the same pins, and requirements.lock
must pin every one of them at a version they accept (make venv and environment.yml install from it)."""
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
            reqs.extend(r for r in dep.get("pip", []) if not r.lstrip().startswith("-"))  # options: -c requirements.lock
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


def lock_pins() -> dict[str, str]:
    """{normalised name: version} of requirements.lock (comments skipped)."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not an exact pin (name==version)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_pins_every_requirement_at_a_version_it_accepts():
    from packaging.specifiers import SpecifierSet

    pins = lock_pins()
    missing = sorted(set(pyproject_requirements()) - set(pins))
    assert not missing, f"requirements.lock lacks {missing}: run make lock"
    wrong = {name: (spec, pins[name]) for name, spec in pyproject_requirements().items()
             if spec and not SpecifierSet(spec).contains(pins[name], prereleases=True)}
    assert not wrong, f"requirements.lock pins versions pyproject.toml refuses: {wrong}"
    assert "wilke-lib" not in pins, "requirements.lock must not pin the package itself (installed editable)"


def test_make_venv_and_environment_yml_install_from_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -r requirements.lock" in makefile and "pip install -e '.[dev]' --no-deps" in makefile
    assert re.search(r"^TORCH_VERSION\s*\?=\s*" + re.escape(lock_pins()["torch"]) + r"\s*$", makefile, re.M)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-c requirements.lock" in pip
