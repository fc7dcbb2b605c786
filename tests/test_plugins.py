"""Plugins through entry points: the example package under tests/plugin_example (a vision-stage
strategy, an inner-LLM strategy and a family, one file each) is installed for real and passes the
conformance kit with no other edit; a broken plugin is reported by name and breaks nothing."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tokenprune
from tokenprune import registry

HERE = Path(__file__).parent
EXAMPLE = HERE / "plugin_example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install`` of the example package into a target folder (no network, no build isolation)."""
    target = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("src") / "plugin_example"   # a copy: the build writes next to the sources
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True, timeout=300)
    assert list(target.glob("tokenprune_scratch-*.dist-info"))
    return target


def test_example_plugins_pass_the_kit(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
                          "--rootdir", str(EXAMPLE), str(EXAMPLE / "kit_check.py")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    last = out.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last, tail
    assert int(last.split(" passed")[0].split()[-1]) >= 40, tail


def test_a_broken_plugin_is_reported_and_breaks_nothing(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[tokenprune.strategies]\nbroken = no_such_module_here.strategy\n"
        "[tokenprune.families]\nbad_family = json:loads\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        with pytest.warns(tokenprune.TokenPruneWarning, match="'broken'"):
            errors = registry.load_plugins(force=True)
        assert "tokenprune.strategies:broken" in errors and "ModuleNotFoundError" in errors["tokenprune.strategies:broken"]
        assert "hiprune" in tokenprune.list_strategies() and "llava" in tokenprune.list_families()
        assert "tokenprune.families:bad_family" not in errors   # not a Family: ignored, not fatal
    finally:
        registry._PLUGIN_ERRORS.clear()


def test_register_family_as_a_decorator_reads_model_types():
    from tokenprune.family import Family

    class Dummy(Family):
        name = "dummy"
        model_types = ("dummy_a", "dummy_b")
    try:
        assert tokenprune.register_family(Dummy) is Dummy
        assert registry.get_family("dummy_a") is Dummy and registry.get_family("dummy_b") is Dummy
        with pytest.raises(registry.DuplicateRegistrationError):
            tokenprune.register_family(Dummy)
    finally:
        registry._FAMILIES.pop("dummy_a", None)
        registry._FAMILIES.pop("dummy_b", None)

    class Nameless(Family):
        name = "nameless"
    with pytest.raises(ValueError, match="model_types"):
        tokenprune.register_family(Nameless)


def test_builtins_are_found_without_import_lists():
    src = (Path(tokenprune.__file__).parent / "strategies" / "__init__.py").read_text()
    assert "hiprune" not in src and "fastv" not in src
    assert "llava" not in (Path(registry.__file__).parent.parent / "patches" / "__init__.py").read_text()
    assert {"fastv", "fopru", "hiprune", "holitom", "holitom_inner", "pool", "random", "visionzip"} <= set(
        tokenprune.list_strategies())
