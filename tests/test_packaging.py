"""The distribution ships every package and every config (so an installed wheel works like the checkout)."""

import pytest

from peft_lab.config import conf_dir
from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_python_package_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("peft_lab", "merging")
        for p in (REPO / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found - listed == set(), f"add these packages to pyproject.toml: {sorted(found - listed)}"
    conf_dirs = [d for d in (REPO / "conf").rglob("*") if d.is_dir()]
    conf_groups = {"peft_lab.conf." + ".".join(d.relative_to(REPO / "conf").parts) for d in conf_dirs}
    assert {"peft_lab.conf", *conf_groups} - listed == set(), "list every conf/ group dir as a peft_lab.conf.* package"


def test_configs_ship_as_package_data():
    cfg = _pyproject()["tool"]["setuptools"]
    assert cfg["package-dir"]["peft_lab.conf"] == "conf"
    globs = cfg["package-data"]["peft_lab.conf"]
    assert "*.yaml" in globs and "**/*.yaml" in globs
    assert conf_dir() == REPO / "conf"


def test_console_script_points_at_cli():
    assert _pyproject()["project"]["scripts"]["peft-lab"] == "peft_lab.cli:main"


def test_cli_usage_and_unknown_command(cli):
    r = cli("--help")
    assert r.returncode == 0 and "merge" in r.stdout and "train" in r.stdout
    r = cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr and "Traceback" not in r.stderr
