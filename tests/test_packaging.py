"""The ways to install minisd agree with each other."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pyproject_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["dev"]


def environment_pip_requirements() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    reqs = []
    for line in lines[start + 1 :]:
        m = re.match(r"^\s+- (.+)$", line)
        if not m:
            break
        reqs.append(m.group(1).strip())
    return reqs


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    env = environment_pip_requirements()
    assert env[-1] == "-e .[dev]", "environment.yml should finish by installing minisd itself"
    assert sorted(env[:-1]) == sorted(pyproject_requirements())
    assert "  - python=3.11" in (ROOT / "environment.yml").read_text().splitlines()


def test_makefile_torch_pin_satisfies_pyproject():
    pin = re.search(r"^TORCH \?= torch==(\d+)\.(\d+)", (ROOT / "Makefile").read_text(), re.M)
    floor = re.search(r"torch>=(\d+)\.(\d+)", " ".join(pyproject_requirements()))
    assert pin and floor
    assert tuple(map(int, pin.groups())) >= tuple(map(int, floor.groups()))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0], "the README should open with `make test`"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
