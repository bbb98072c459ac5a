"""``rollout env new``: the files it writes, and the names and places it refuses.

The whole path (scaffold, pip install, the package's own tests, serve, eval) runs in
tests/test_authoring.py, which follows docs/authoring.md.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rollout.scaffold import ScaffoldError, new_environment

ROLLOUT = Path(sys.executable).parent / "rollout"


def test_writes_an_installable_package_with_its_entry_point(tmp_path: Path) -> None:
    written = new_environment("grid-walk", tmp_path / "pkg")
    assert sorted(p.relative_to(tmp_path / "pkg").as_posix() for p in written) == [
        "README.md", "grid_walk/__init__.py", "grid_walk/env.py", "pyproject.toml", "tests/test_env.py",
    ]
    project = tomllib.loads((tmp_path / "pkg" / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["envfleet.envs"] == {"grid_walk": "grid_walk.env:GridWalkEnv"}
    assert "check_environment(GridWalkEnv" in (tmp_path / "pkg" / "tests" / "test_env.py").read_text()


def test_the_generated_package_passes_its_tests_in_place(tmp_path: Path) -> None:
    done = subprocess.run([ROLLOUT, "env", "new", "grid-walk", "--dir", tmp_path / "pkg"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "wrote" in done.stderr, done.stderr
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path / "pkg", capture_output=True, text=True, timeout=120
    )
    assert tests.returncode == 0 and "2 passed" in tests.stdout, tests.stdout + tests.stderr


@pytest.mark.parametrize("name", ["My Env", "9lives", "a/b", "", "-x", "x" * 65, "json", "class", "pytest", "envserver"])
def test_refuses_names_that_are_not_new_module_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError):
        new_environment(name, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_never_writes_over_a_directory_with_files(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mine.txt").write_text("keep me")
    done = subprocess.run([ROLLOUT, "env", "new", "grid-walk", "--dir", tmp_path / "pkg"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith("rollout: error: ") and "not an empty directory" in done.stderr
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["mine.txt"]
