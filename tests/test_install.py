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


def test_license_file_is_the_apache_license_text():
    """LICENSE is the Apache License 2.0 word for word: the text peft (a dependency, Apache-2.0
    in its metadata) ships as its license, up to line breaks and indentation."""
    from importlib.metadata import distribution

    peft = distribution("peft")
    assert "Apache" in (peft.metadata["License-Expression"] or peft.metadata["License"])
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as fh:
        ours = fh.read().split()
    assert ours == peft.read_text("licenses/LICENSE").split()


def test_wheel_and_sdist_declare_and_ship_the_license(tmp_path):
    """The built distributions say Apache-2.0 and carry LICENSE byte for byte."""
    import tarfile

    proj = tmp_path / "proj"
    proj.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, f), proj / f)
    shutil.copytree(os.path.join(ROOT, "lalmtool"), proj / "lalmtool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "meta").mkdir()
    (tmp_path / "sdist").mkdir()
    res = subprocess.run(
        [sys.executable, "-c", "import json\nfrom setuptools import build_meta as b\n"
         "names = [b.prepare_metadata_for_build_wheel('../meta'), b.build_sdist('../sdist')]\n"
         "open('../names.json', 'w').write(json.dumps(names))"],
        cwd=proj, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    dist_info, sdist = json.loads((tmp_path / "names.json").read_text())
    version = project()["version"]
    assert (dist_info, sdist) == (f"lalmtool-{version}.dist-info", f"lalmtool-{version}.tar.gz")
    with open(os.path.join(ROOT, "LICENSE"), "rb") as fh:
        license_bytes = fh.read()
    wheel_meta = (tmp_path / "meta" / dist_info / "METADATA").read_text().splitlines()
    assert [line for line in wheel_meta if line.startswith("License")] == [
        "License-Expression: Apache-2.0", "License-File: LICENSE"]
    assert (tmp_path / "meta" / dist_info / "licenses" / "LICENSE").read_bytes() == license_bytes
    with tarfile.open(tmp_path / "sdist" / sdist) as tar:
        top = f"lalmtool-{version}"
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode().splitlines()
        assert [line for line in pkg_info if line.startswith("License")] == [
            "License-Expression: Apache-2.0", "License-File: LICENSE"]
        assert tar.extractfile(f"{top}/LICENSE").read() == license_bytes


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


# -- PEP 668: where install.sh installs (lalmtool/setup_python.py), decided without the system --
from lalmtool import setup_python  # noqa: E402


@pytest.mark.parametrize("marker,prefix,conda,want", [
    (True, "/usr", "", "venv"),                   # stock Debian/Ubuntu python3, nothing active
    (True, "/home/u/env", "", "here"),            # a venv made from it is active
    (True, "/usr", "/opt/conda/envs/x", "here"),  # a conda environment is active
    (False, "/usr", "", "here"),                  # pyenv, a self-built or a conda python
])
def test_install_target_is_a_project_venv_only_for_an_unmanaged_choice(tmp_path, marker, prefix,
                                                                       conda, want):
    stdlib = tmp_path / "lib" / "python3.13"
    stdlib.mkdir(parents=True)
    if marker:
        (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\n")
    managed = setup_python.externally_managed(str(stdlib))
    active = setup_python.in_environment(prefix, "/usr", {"CONDA_PREFIX": conda} if conda else {})
    assert (managed, setup_python.choose(managed, active)) == (marker, want)


def test_install_sh_asks_setup_python_and_installs_into_what_it_chose():
    with open(os.path.join(ROOT, "install.sh"), encoding="utf-8") as fh:
        script = fh.read()
    assert "where=$(python3 lalmtool/setup_python.py)" in script
    assert '[ -x .venv/bin/python ] || python3 -m venv .venv' in script
    assert '"$python" -m pip install -q -c constraints.txt -e ".[test]"' in script
    assert "\npython3 -m pip" not in script  # never pip into the interpreter PEP 668 protects


def test_setup_python_runs_on_a_bare_interpreter_and_says_here_in_this_one():
    out = subprocess.run([sys.executable, "-I", os.path.join(ROOT, "lalmtool", "setup_python.py")],
                         capture_output=True, text=True, check=True).stdout
    assert out == setup_python.choose(setup_python.externally_managed(),
                                      setup_python.in_environment()) + "\n"


@pytest.mark.skipif(not os.path.isfile("/usr/lib/python3.11/EXTERNALLY-MANAGED")
                    or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs Debian's own externally managed /usr/bin/python3")
def test_debians_own_python3_gets_the_project_venv():
    out = subprocess.run(["/usr/bin/python3", "-I", os.path.join(ROOT, "lalmtool",
                                                                 "setup_python.py")],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin"})
    assert out.stdout == "venv\n"


@pytest.mark.parametrize("venv,installed,reexec", [(True, False, True), (True, True, False),
                                                   (False, False, False)])
def test_pytest_from_a_stock_python3_reruns_in_the_project_venv(tmp_path, venv, installed,
                                                                reexec):
    python = tmp_path / ".venv" / "bin" / "python"
    if venv:
        python.parent.mkdir(parents=True)
        python.write_text("#!/bin/sh\n")
        python.chmod(0o755)
    calls = []
    done = setup_python.reexec_in_venv(str(tmp_path), ["-q", "tests/x.py"], installed,
                                       execv=lambda *a: calls.append(a))
    assert done is reexec
    assert calls == ([(str(python), [str(python), "-m", "pytest", "-q", "tests/x.py"])]
                     if reexec else [])


def test_the_test_interpreter_is_judged_by_what_it_can_import_not_by_lalmtool(tmp_path):
    """From the repository root any python3 finds lalmtool's source and lalmtool.egg-info (an
    editable install writes it there): Debian's own python3 took that as installed and ran
    the tests without numpy instead of rerunning them in .venv."""
    import importlib.util

    spec = importlib.util.find_spec
    assert setup_python.has_requirements(spec) is True  # this interpreter has them all
    missing = []
    assert setup_python.has_requirements(
        lambda name: missing.append(name) if name == "torch" else spec(name)) is False
    assert missing == ["torch"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(  # Debian's python3 has no numpy; from the root it sees lalmtool
        ["/usr/bin/python3", "-c", "import lalmtool.setup_python as s; "
                                   "print(s.has_requirements())"],
        cwd=root, capture_output=True, text=True, env={"PATH": "/usr/bin"})
    if out.returncode or not os.path.exists("/usr/lib/python3.11/EXTERNALLY-MANAGED"):
        pytest.skip("no stock Debian python3 here")
    assert out.stdout == "False\n"


def test_the_venv_made_from_this_python3_is_told_apart_by_its_prefix(tmp_path):
    """The venv's bin/python links to the interpreter it was made from (Debian's
    /usr/bin/python3): their real paths are equal, so only sys.prefix says which one runs."""
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    calls = []
    execv = lambda path, argv: calls.append(path)  # noqa: E731
    assert setup_python.reexec_in_venv(str(tmp_path), ["-q"], False, execv,
                                       prefix=sys.base_prefix) is True
    assert setup_python.reexec_in_venv(str(tmp_path), ["-q"], False, execv,
                                       prefix=str(tmp_path / ".venv")) is False
    assert calls == [str(python)]  # once: from the system python, never from the venv


def test_the_rerun_in_the_venv_prints_its_output_and_returns_its_status(tmp_path):
    """The rerun replaces the pytest that imports conftest.py; that pytest had redirected
    stdout and stderr into its capture files, and the rerun's report went there, unseen."""
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho \"rerun: $*\"\necho oops >&2\nexit 3\n")
    python.chmod(0o755)
    (tmp_path / "conftest.py").write_text(
        "from lalmtool.setup_python import reexec_in_venv\n"
        f"reexec_in_venv({str(tmp_path)!r}, ['-q', 'x'], False)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": root})
    assert (r.returncode, r.stdout, r.stderr) == (3, "rerun: -m pytest -q x\n", "oops\n")
