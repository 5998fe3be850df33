"""The install keeps a user's own (CUDA) torch: ranges in pyproject.toml, exact pins for CI in
constraints.txt, a Python floor that the dependencies accept, and the license pyproject names."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import metadata

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]


def requirements() -> dict[str, Requirement]:
    p = project()
    reqs = [Requirement(r) for r in p["dependencies"] + p["optional-dependencies"]["test"]]
    return {canonicalize_name(r.name): r for r in reqs}


def pins() -> dict[str, Version]:
    out = {}
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#")[0].strip()
            if line:
                name, _, ver = line.partition("==")
                assert _ == "==", f"constraints.txt: {line!r} is not an exact pin"
                out[canonicalize_name(name)] = Version(ver)
    return out


@pytest.mark.parametrize("build", ["2.6.0+cu124", "2.9.1+cu128", "2.11.0", "2.14.1",
                                   "2.14.1+cu130"])
def test_users_torch_builds_satisfy_the_ranges(build):
    reqs = requirements()
    assert reqs["torch"].specifier.contains(build, prereleases=False)
    assert reqs["torchaudio"].specifier.contains(build.replace("2.14.1", "2.11.0"))


@pytest.mark.parametrize("build", ["2.5.1+cu121", "3.0.0"])
def test_torch_outside_what_transformers_5_runs_with_is_refused(build):
    # transformers 5 disables PyTorch older than 2.6; a new major release is untested
    assert not requirements()["torch"].specifier.contains(build)


def test_constraints_pin_exactly_what_the_ranges_admit():
    reqs, pinned = requirements(), pins()
    assert sorted(set(reqs) - set(pinned)) == []  # CI installs exact releases only
    for name, version in pinned.items():
        if name in reqs:
            assert reqs[name].specifier.contains(version), (name, str(version))
    for name in ("torch", "transformers", "peft"):  # ranges, never exact pins
        assert not any(s.operator == "==" for s in reqs[name].specifier), name
    assert pinned["torch"] == Version("2.14.1") and pinned["transformers"] == Version("5.24.0")


def test_python_floor_is_what_the_dependencies_need():
    floor = project()["requires-python"]
    assert floor == ">=3.11"
    lowest = SpecifierSet(floor)
    assert lowest.contains(f"{sys.version_info.major}.{sys.version_info.minor}")
    for name in ("transformers", "torch", "peft", "h5py", "numpy", "scipy", "matplotlib"):
        needs = metadata(name).get("Requires-Python") or ""
        assert SpecifierSet(needs).contains("3.11"), (name, needs)
    assert not SpecifierSet(metadata("transformers")["Requires-Python"]).contains("3.10")


def test_license_file_is_the_apache_license():
    p = project()
    assert (p["license"], p["license-files"]) == ("Apache-2.0", ["LICENSE"])
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as fh:
        text = fh.read()
    assert " ".join(text.split()[:4]) == "Apache License Version 2.0,"
    assert "END OF TERMS AND CONDITIONS" in text and len(text.split()) == 1581


def test_pip_install_keeps_an_installed_cuda_torch(tmp_path):
    """`pip install -e .` next to torch 2.9.1+cu128 installs lalmtool and nothing else."""
    proj = tmp_path / "proj"
    (proj / "lalmtool").mkdir(parents=True)
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, f), proj / f)
    (proj / "lalmtool" / "__init__.py").write_text("")
    fake = tmp_path / "site" / "torch-2.9.1+cu128.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.1+cu128\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), PIP_NO_INPUT="1")
    report = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
         "--no-build-isolation", "--quiet", "--report", str(report), "-e", str(proj)],
        env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    installs = [(i["metadata"]["name"], i["metadata"]["version"])
                for i in json.loads(report.read_text())["install"]]
    assert installs == [("lalmtool", project()["version"])]
