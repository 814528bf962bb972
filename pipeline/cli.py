"""The ``daam-pipeline`` command: thin click commands that parse, validate and call one library function."""

from __future__ import annotations

import functools
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.errors import ConfigError, JobTerminated, LeaseLostError, PipelineError
from pipeline.names import RENDER_QUERIES, RENDER_QUERY_ALIASES

__all__ = ["main"]

_LAST_RESORT_S = 10.0
"""A stopped run that has not ended this long after the signal is ended by its watchdog (runner.stops)."""


def _user_errors(command: Callable) -> Callable:
    """A user's mistake (bad job, missing shard, ...) ends with one clear line and exit code 2, no traceback; a
    lease taken by another driver meanwhile (not a user's mistake) with one line and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LeaseLostError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--set")
        result[key] = yaml.safe_load(value)
    return result


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="daam-pipeline")
def main(verbose: int) -> None:
    """Dynamic Accumulated Attention Maps for timm Vision Transformers, at dataset scale."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


_set_option = click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a job field, e.g. --set output.path=/tmp/x"
)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--address", default=None, help="Join this Ray cluster (e.g. 'auto'); default: start a local one.")
@click.option("--overwrite", is_flag=True, help="Remove earlier outputs first (default: resume, skip done units).")
@click.option("--dry-run", is_flag=True, help="Print the resolved plan (units, actors, outputs) and exit.")
@click.option("--no-ray", is_flag=True, help="Run every unit in this process, without a Ray cluster.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--inject-fault", default=None, hidden=True, metavar="UNIT:BATCHES", help="Kill a worker (tests).")
@click.option(
    "--break-lease", is_flag=True, help="Take the output's lease from a driver on another node known to be dead."
)
@click.option(
    "--redo-changed", is_flag=True, help="Redo done units whose shard changed since (same name, other samples)."
)
@_set_option
@_user_errors
def run(job_file, address, overwrite, dry_run, no_ray, quiet, inject_fault, break_lease, redo_changed, sets) -> None:
    """Explain every sample of JOB_FILE's shards and write maps (Zarr) and statistics (Parquet)."""

    def load() -> Any:
        from pipeline.config import load_job

        return load_job(job_file, _overrides(sets))

    _run_and_report(
        load,
        address=address,
        overwrite=overwrite,
        use_ray=not no_ray,
        dry_run=dry_run,
        fault=inject_fault,
        progress=not quiet,
        break_lease=break_lease,
        redo_changed=redo_changed,
    )


def _run_and_report(load: Callable[[], Any], **options: Any) -> None:
    """Load a job, run it, print its summary and headline tables, and exit with its code: 130/143 when stopped
    (the signal handlers come first: every phase stops the same way), 1 when another driver took the lease."""
    from pipeline.runner.stops import Stops, exit_code, stopped_message

    with Stops(last_resort_s=_LAST_RESORT_S) as stops:
        try:
            job = load()
            stops.job = job.name
            from pipeline.runner import run_job

            summary = run_job(job, stops=stops, **options)
        except (KeyboardInterrupt, JobTerminated) as e:
            _exit_now(exit_code(e), f"\n{stopped_message(stops.job, e)}", stops)
        except LeaseLostError as e:
            _exit_now(1, f"error: {e}", stops)
    from pipeline.store.output import job_output

    if options.get("dry_run"):
        return
    click.echo(summary.render())
    if summary.done + summary.skipped:
        click.echo(_headline(job_output(job)))
    sys.exit(summary.exit_code)


@main.command()
@click.option("--ssl", is_flag=True, help="The self-supervised demo (a k-NN memory bank from the demo train split).")
@click.option("--out", default=None, help="Output folder; default out/demo or out/demo-ssl under this folder.")
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming.")
@click.option("--no-ray", is_flag=True, help="Run every unit in this process, without a Ray cluster.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_set_option
@_user_errors
def demo(ssl, out, overwrite, no_ray, quiet, sets) -> None:
    """Run the built-in demo (shipped model and shards of synthetic scenes) from any folder: the shipped job
    demo.yaml (or demo-ssl.yaml), as `daam-pipeline jobs show demo` prints it."""
    from pipeline.config import load_job

    name = "demo-ssl" if ssl else "demo"
    overrides = {"output.path": out} if out else {}
    overrides |= _overrides(sets)
    _run_and_report(
        lambda: load_job(_shipped_job(name), overrides), overwrite=overwrite, use_ray=not no_ray, progress=not quiet
    )


def _shipped_job(name: str) -> Path:
    from pipeline.examples import shipped_job

    return shipped_job(name)


@main.group(invoke_without_command=True)
@click.pass_context
def jobs(ctx) -> None:
    """List the example jobs shipped with the package (`jobs show NAME` prints one, to copy and edit)."""
    if ctx.invoked_subcommand is not None:
        return
    from pipeline.examples import shipped_jobs

    paths = shipped_jobs()
    width = max((len(path.stem) for path in paths), default=0)
    for path in paths:
        first = next((line.removeprefix("#").strip() for line in path.read_text().splitlines() if line.strip()), "")
        click.echo(f"{path.stem:{width}s}  {textwrap.shorten(first, 100, placeholder=' ...')}")


@jobs.command("show")
@click.argument("name")
@click.option(
    "--data-root",
    default="data",
    show_default=True,
    help="Where the copy reads its inputs (shards, checkpoint): relative to the copy's folder, absolute, or a URL.",
)
@_user_errors
def jobs_show(name, data_root) -> None:
    """Print the shipped job NAME as a copy for this folder (`daam-pipeline jobs show dino > dino.yaml`): its input
    paths read DATA_ROOT (data/ beside the copy), and its comments say how to write them there."""
    from pipeline.examples import job_copy

    click.echo(job_copy(name, data_root), nl=False)


def _exit_now(code: int, line: str, stops: Any) -> None:
    """Say why and exit at once: the actors and the lease are released already, and a unit thread blocked in a read
    that never returns (a hung mount) must not keep the process alive at interpreter exit."""
    click.echo(line, err=True)
    stops.said = True
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _headline(out: Any) -> str:
    from pipeline.summaries import headline_tables

    return headline_tables(out)


@main.command()
@click.argument("out")
@_user_errors
def summary(out) -> None:
    """Print the headline tables of a job's outputs at OUT: per-block localisation and the method comparison."""
    from pipeline.store.results import open_results

    open_results(out).require_units()  # an empty or in-progress output: one line saying so
    click.echo(_headline(out))


@main.command()
@click.argument("out")
@click.option("--lease-ttl", default=60.0, show_default=True, help="Seconds the lease on OUT stays valid unrenewed.")
@click.option("--break-lease", is_flag=True, help="Take OUT's lease from a driver on another node known to be dead.")
@_user_errors
def compact(out, lease_ttl, break_lease) -> None:
    """Merge the per-unit Parquet tables of OUT into a few large files (a run does this at its end)."""
    from pipeline.store.compact import compact as compact_tables
    from pipeline.store.lease import Lease
    from pipeline.store.output import as_output

    output = as_output(out)
    with Lease(output, lease_ttl, break_lease=break_lease) as lease:
        done = compact_tables(output, fence=lease.fence())
    click.echo(
        f"compacted the tables of {done.units} units of {out} into {done.files} files (generation "
        f"{done.generation}); {done.merged_files} per-unit files merged and removed"
    )


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-inputs", is_flag=True, help="Check the job file alone: no shards, model, checkpoint or bank.")
@_set_option
@_user_errors
def validate(job_file, no_inputs, sets) -> None:
    """Check JOB_FILE (keys, types, shards, model, checkpoint, labels, bank) without running it: the checks `run`
    makes before any worker starts."""
    from pipeline.config import load_job
    from pipeline.runner.preflight import preflight

    job = load_job(job_file, _overrides(sets))
    if no_inputs:
        click.echo(
            f"job {job.name} is valid as a job file (inputs not checked): model {job.model.name}, mode {job.mode}"
        )
        return
    checked = preflight(job)
    click.echo(f"job {job.name} is valid: {len(checked.urls)} shard(s), model {job.model.name}, mode {job.mode}")


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--kind", type=click.Choice(["imagefolder", "imagenet-val", "list"]), default=None, help="Default: detected."
)
@click.option("--samples-per-shard", default=1000, show_default=True)
@click.option("--prefix", default="shard", show_default=True)
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None, help="ImageNet-val labels.")
@click.option("--boxes", type=click.Path(exists=True, file_okay=False), default=None, help="Folder of box XMLs.")
@click.option(
    "--masks",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of object masks laid out like SRC (<stem>.png: one channel, 0 background, 1 object).",
)
@_user_errors
def shard(src, out, kind, samples_per_shard, prefix, labels, boxes, masks) -> None:
    """Write WebDataset shards of SRC (ImageFolder tree, ImageNet-val folder or path,label list) into OUT."""
    from pipeline.data.shards import shard_source

    index = shard_source(
        src,
        out,
        kind=kind,
        samples_per_shard=samples_per_shard,
        prefix=prefix,
        labels=labels,
        boxes=boxes,
        masks=masks,
    )
    total = sum(entry["samples"] for entry in index)
    click.echo(f"wrote {total} samples in {len(index)} shard(s) to {out} (index: {out / 'index.json'})")


@main.command()
@click.argument("out")
@click.option("--key", "keys", multiple=True, help="Sample key to draw (repeatable).")
@click.option(
    "--query",
    type=click.Choice([*RENDER_QUERIES, *RENDER_QUERY_ALIASES]),
    default=None,
    help="Pick samples instead of --key: by their settle block (the first block from which the top-20% patches of "
    "D_l stay within IoU 0.9 of the final map's), wrong predictions, or at random.",
)
@click.option("--count", default=8, show_default=True, help="Samples a query draws.")
@click.option("--block-maps", is_flag=True, help="Add a row of the per-block maps M_l.")
@click.option("--no-animation", is_flag=True, help="PNG grids only.")
@click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(["png", "gif", "mp4"]),
    help="Default: all (mp4 where ffmpeg is on the PATH); an explicit mp4 without ffmpeg is an error.",
)
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None, help="Default: OUT/renders.")
@click.option("--size", default=224, show_default=True, help="Panel size in pixels.")
@click.option("--class-names", type=click.Path(dir_okay=False), default=None, help="Text (one per line) or JSON list.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random query.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def render(out, keys, query, count, block_maps, no_animation, formats, dest, size, class_names, seed, quiet) -> None:
    """Draw the attention flow of samples of OUT: a grid of D_l over the image per block, and an animation."""
    from pipeline.viz import render as render_samples

    if not keys and not query:
        raise click.UsageError("give --key KEY (repeatable) or --query")
    paths = render_samples(
        out,
        list(keys) or None,
        query=query,
        count=count,
        block_maps=block_maps,
        animation=not no_animation,
        formats=formats or None,  # default: every format this machine can write
        dest=dest,
        size=size,
        class_names=class_names,
        seed=seed,
        progress=not quiet,
    )
    for path in paths:
        click.echo(str(path))


@main.command()
@click.argument("out")
@click.option("--dest", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: OUT/report.html.")
@click.option("--gallery", default=6, show_default=True, help="Samples in the gallery.")
@click.option("--top-classes", default=4, show_default=True, help="Classes with their own curves.")
@click.option("--size", default=128, show_default=True, help="Gallery panel size in pixels.")
@click.option("--class-names", type=click.Path(dir_okay=False), default=None, help="Text (one per line) or JSON list.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def report(out, dest, gallery, top_classes, size, class_names, quiet) -> None:
    """Write one self-contained HTML report of OUT: failures, per-block curves, settle blocks, evaluation (with its
    curves), gallery."""
    from pipeline.viz import report as write_report

    path = write_report(
        out, dest, gallery=gallery, top_classes=top_classes, size=size, class_names=class_names, progress=not quiet
    )
    click.echo(str(path))


@main.command()
@click.argument("out")
@click.option(
    "--dest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Default: OUT/evaluation_stored.parquet.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def evaluate(out, dest, quiet) -> None:
    """Evaluate the maps stored in OUT again, with its job's model, shards and evaluate: settings, and compare with
    the evaluation table (computed from the float32 maps before they were stored)."""
    from pipeline.reevaluate import default_destination, describe, evaluate_stored
    from pipeline.store.results import open_results

    results = open_results(out)
    again = evaluate_stored(out, progress=not quiet)
    path = dest or default_destination(results)
    again.to_parquet(path, index=False)
    click.echo(f"{len(again)} (sample, method) rows evaluated from the stored maps of {out}, written to {path}")
    click.echo(describe(results.evaluation, again))


@main.command()
@click.argument("outs", nargs=-1, required=True, metavar="OUT_A OUT_B [OUT ...]")
@click.option("--name", "names", multiple=True, metavar="OUT=NAME", help="An output's name in the tables (repeatable).")
@click.option(
    "--out", "dest", type=click.Path(dir_okay=False, path_type=Path), default=Path("compare.html"), show_default=True
)
@click.option("--disagreements", default=3, show_default=True, help="Samples drawn per pair, those that agree least.")
@click.option("--size", default=80, show_default=True, help="Picture panel size in pixels.")
@click.option("--class-names", type=click.Path(dir_okay=False), default=None, help="Text (one per line) or JSON list.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def compare(outs, names, dest, disagreements, size, class_names, quiet) -> None:
    """Compare the outputs of several models over the same data: print the headline tables and write one HTML
    report (curves on relative depth, when each model's decision settles, agreement on shared samples, per class,
    evaluation metrics)."""
    from pipeline.compare import compare as compare_outputs
    from pipeline.compare import comparison_tables
    from pipeline.viz.compare_report import compare_report

    comparison = compare_outputs(*outs, names=_output_names(outs, names))
    click.echo(comparison_tables(comparison))
    path = compare_report(
        comparison, dest, disagreements=disagreements, size=size, class_names=class_names, progress=not quiet
    )
    click.echo(str(path))


def _output_names(outs: tuple[str, ...], pairs: tuple[str, ...]) -> list[str | None]:
    """The ``--name OUT=NAME`` of each output (None: the default name)."""
    names: list[str | None] = [None] * len(outs)
    for pair in pairs:
        found = [i for i, out in enumerate(outs) if pair.startswith(f"{out}=")]
        if not found:
            raise ConfigError(f"--name {pair}: {pair.partition('=')[0]} is not one of the compared outputs")
        names[found[0]] = pair[len(outs[found[0]]) + 1 :]
    return names


@main.group()
def bank() -> None:
    """Memory banks of self-supervised jobs."""


@bank.command("import")
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.argument("labels", type=click.Path(exists=True, dir_okay=False))
@click.argument("out")
@click.option("--k", default=20, show_default=True, help="Neighbours stored as the bank's default k.")
@click.option("--temperature", default=0.07, show_default=True, help="Stored default temperature.")
@click.option("--overwrite", is_flag=True, help="Replace a bank at OUT.")
@_user_errors
def bank_import(features, labels, out, k, temperature, overwrite) -> None:
    """Turn a feature dump into a bank at OUT (a job's bank.path): FEATURES (M, D) and LABELS (M,) as torch files
    (DINO's eval_knn.py --dump_features: trainfeat.pth, trainlabels.pth) or .npy files."""
    from pipeline.store.bank import import_feature_dump

    built = import_feature_dump(features, labels, out, k=k, temperature=temperature, overwrite=overwrite)
    labelled = f"{built.num_classes} classes" if built.num_classes else "no labels"
    click.echo(f"memory bank of {built.size} samples (D={built.dim}, {labelled}) written to {out}")


@main.command()
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if a file in DEST differs from the code.")
@_user_errors
def schemas(dest, check) -> None:
    """Write the output contracts (Arrow schemas of the tables, Zarr layout) as JSON into DEST, from their
    definitions in pipeline/store/schemas.py; the repository's copy is schemas/."""
    from pipeline.store.schemas import export_schemas, stale_schemas

    if check:
        stale = stale_schemas(dest)
        if stale:
            click.echo(f"{len(stale)} file(s) in {dest} differ from pipeline/store/schemas.py:", err=True)
            for name in stale:
                click.echo(f"  {dest / name}", err=True)
            click.echo(f"regenerate them with: daam-pipeline schemas {dest}", err=True)
            sys.exit(1)
        click.echo(f"the schemas in {dest} agree with pipeline/store/schemas.py")
        return
    paths = export_schemas(dest)
    click.echo(f"wrote {len(paths)} schema files to {dest}")


@main.command("demo-assets")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Default: the package's.")
@click.option("--shards-only", is_flag=True, help="Write the shards only; keep the models.")
@_user_errors
def demo_assets(out, shards_only) -> None:
    """Regenerate the built-in demo data and retrain the shipped demo models (deterministic)."""
    from pipeline.demo.train import ASSETS_DIR, build_demo_assets, write_demo_shards

    if shards_only:
        write_demo_shards(out or ASSETS_DIR)
        click.echo(f"demo shards written to {out or ASSETS_DIR}")
        return
    metas = build_demo_assets(out or ASSETS_DIR)
    accuracies = ", ".join(f"{stem} {meta['val_accuracy']:.3f}" for stem, meta in metas.items())
    click.echo(f"demo assets written to {out or ASSETS_DIR}: validation accuracy {accuracies}")


if __name__ == "__main__":
    main()
