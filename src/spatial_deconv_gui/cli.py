"""`spatial-deconv`: info, validate, run, consensus and demo from the shell."""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import keys
from .engines.base import Cancelled
from .engines.cluster import PiecesFailed
from .engines.options import add_config_flags, add_scheduler_options, given_options
from .io.errors import InputError

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


def _base_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spatial-deconv", description="Spatial transcriptomics deconvolution.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, methods and compute devices")
    info.add_argument("--json", action="store_true")

    val = sub.add_parser("validate", help="check a slide and its reference; exit 2 when they cannot be used")
    val.add_argument("spatial", help=SLIDE_HELP)
    val.add_argument("reference", nargs="?")
    _add_input_options(val)
    val.add_argument("--cell-min", type=int, default=25, help="minimum cells per reference type (default 25)")
    val.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="deconvolve a slide; method options follow --method (see --method M --help)")
    run.add_argument("spatial", help=SLIDE_HELP)
    run.add_argument("reference")
    run.add_argument("--method", required=True, help="deconvolution method")
    _add_input_options(run)
    run.add_argument(
        "--numi-col",
        default=keys.NUMI,
        help="spatial obs column with each spot's total UMI, used when present ('none': row sums)",
    )
    run.add_argument(
        "--ref-numi-col",
        default=keys.NUMI,
        help="reference obs column with each cell's total UMI, used when present ('none': row sums)",
    )
    run.add_argument(
        "--output",
        "-o",
        help="result .h5ad (default: <slide>_<method>.h5ad beside the input), or, for "
        "a SpatialData input, a new .zarr holding its elements and the result",
    )
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_scheduler_options(run, "rctd's per-spot fits")
    run.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write a nominal 90%% interval per spot and type (obsm <key>_proportions_q05 / _q95); "
        "rctd (full and doublet modes) and flash",
    )
    run.add_argument(
        "--with-counts",
        action="store_true",
        help="also write the slide's counts (X and layers, gzip) into the .h5ad output; by default it holds the "
        "results with the slide's obs, var, obsm and uns, and no counts (the input has them)",
    )
    run.add_argument("--csv", help="also write the proportions table as CSV")
    run.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    cons = sub.add_parser(
        "consensus",
        help="combine two or more results of one slide into a consensus with a per-spot agreement",
        description=f"Writes obsm['{keys.proportions(keys.CONSENSUS)}'] (per spot and type the inverse-variance "
        "weighted mean of the results' proportions when every result has its 90% interval, else their mean; rows "
        f"renormalised), obs['{keys.CONSENSUS_AGREEMENT}'] (1 - mean pairwise total-variation distance, in [0, 1]) "
        f"and uns['{keys.CONSENSUS_TYPE_AGREEMENT}'] (per cell type) into a copy of the first input; with interval "
        f"weights also the consensus's 90% interval, obsm['{keys.proportions_lower(keys.CONSENSUS)}'] and "
        f"obsm['{keys.proportions_upper(keys.CONSENSUS)}'] (widened where the methods disagree).",
    )
    cons.add_argument("results", nargs="+", help="result files (.h5ad) of runs on the same slide")
    cons.add_argument("--output", "-o", required=True, help="the consensus .h5ad")
    cons.add_argument(
        "--key",
        action="append",
        default=None,
        help="the result to take from each file (e.g. rctd), when a file holds several: once for all inputs, or "
        "once per input in their order",
    )
    cons.add_argument(
        "--align-types",
        action="store_true",
        help="combine the cell types every result has (each result renormalised over them) instead of refusing "
        "results with different types",
    )
    cons.add_argument(
        "--weighting",
        default="auto",
        choices=["auto", "intervals", "equal"],
        help="auto: inverse-variance weights from the 90%% intervals when every result has them, else equal",
    )
    cons.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    cons.add_argument("--quiet", "-q", action="store_true", help="no notices")

    from .perturb_cli import add_perturb_parser

    add_perturb_parser(sub)

    demo = sub.add_parser("demo", help="open napari with the bundled sample slide and the plugin's widgets")
    demo.add_argument("--headless", metavar="OUTDIR", help="no window: run on the sample and write results and a PNG")
    demo.add_argument("--method", default=None, help="method the demo runs (default: the first available)")
    return p


SLIDE_HELP = (
    "the slide: an .h5ad, a Space Ranger outs/ folder (Visium, Visium HD, or one "
    "binned_outputs/square_NNNum/ folder), a Xenium output bundle, or a SpatialData .zarr"
)


def _add_input_options(p: argparse.ArgumentParser):
    from .perturb_cli import add_slide_options

    add_slide_options(p)
    p.add_argument("--cell-type-col", default=keys.CELL_TYPE, help="reference obs column with cell types")
    p.add_argument("--layer", default=None, help="spatial counts layer (default X)")
    p.add_argument("--reference-layer", default=None, help="reference counts layer (default X)")
    p.add_argument("--coords", default=None, help="obsm key or 'xcol,ycol' obs columns with coordinates")


class _MethodParser(argparse.ArgumentParser):
    """A method's option parser whose "unrecognized arguments" error names the closest options (``--epochs`` ->
    ``--max-epochs``): a user guessing a flag name gets the fix, not only the usage."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            hints = []
            for token in message.split(":", 1)[1].split():
                name = token.split("=", 1)[0]
                if not name.startswith("--"):
                    continue
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
                close = [k for k in close if k.endswith(name[2:])] or close  # --epochs: the *-epochs options
                if close:
                    hints.append(f"{name}: did you mean {' or '.join(close)}?")
            if hints:
                message = f"{message}. {' '.join(hints)} (--help lists every option)"
        super().error(message)


def method_parser(config_cls, method: str) -> argparse.ArgumentParser:
    """Flags generated from the method's typed config: ``umi_min`` becomes ``--umi-min``."""
    p = _MethodParser(prog=f"spatial-deconv run ... --method {method}", add_help=True)
    # the device is a flag of `run` itself, shared by every method; `run` reads --uncertainty too, so that a method
    # without intervals gets a clear message, while --method M --help still lists it with the method's help text
    add_config_flags(p, config_cls, skip=("device",))
    return p


class _Progress:
    """tqdm bars on stderr, one per engine stage."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.stage = None

    def __call__(self, event):
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(
                total=100,
                desc=event.stage,
                file=sys.stderr,
                leave=True,
                bar_format="{desc:<16} {percentage:3.0f}%|{bar:30}| {elapsed}<{remaining} {postfix}",
            )
        self.bar.n = round(100 * event.fraction)
        if event.message:
            self.bar.set_postfix_str(event.message, refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.n = self.bar.total
            self.bar.refresh()
            self.bar.close()
            self.bar = None


def _cmd_info(args) -> int:
    from .api import system_info

    info = system_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {', '.join(map(str, v)) if isinstance(v, list) else v}")
    return EXIT_OK


def _cmd_validate(args) -> int:
    from .io.validate import validate
    from .perturb_cli import slide_options

    report = validate(
        args.spatial,
        args.reference,
        cell_type_col=args.cell_type_col,
        layer=args.layer,
        reference_layer=args.reference_layer,
        coord_key=args.coords,
        min_cells_per_type=args.cell_min,
        slide_options=slide_options(args),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return EXIT_OK if report.ok else EXIT_INPUT


def _cmd_run(args, extra: list[str]) -> int:
    from . import api
    from .engines.registry import get_method
    from .perturb_cli import slide_options

    info = get_method(args.method)
    _, config_cls = info.load()
    margs = method_parser(config_cls, args.method).parse_args(extra)
    params = given_options(margs, config_cls, skip=("device",))
    if args.uncertainty:
        api.check_intervals(info.name, config_cls)  # before any reading: a method without intervals is quick
    out_path = Path(args.output) if args.output else default_output(Path(args.spatial), args.method)
    api.check_output(out_path, args.spatial, args.reference)
    if args.csv:
        api.check_output(Path(args.csv), args.spatial, args.reference, side_file=True)
    progress = _Progress(args.quiet)
    failure = None
    try:
        run = api.run_deconvolution(
            args.spatial,
            args.reference,
            args.method,
            params=params,
            cell_type_col=args.cell_type_col,
            layer=args.layer,
            reference_layer=args.reference_layer,
            coord_key=args.coords,
            numi_column=None if args.numi_col.lower() == "none" else args.numi_col,
            reference_numi_column=None if args.ref_numi_col.lower() == "none" else args.ref_numi_col,
            device=args.device,
            progress=progress,
            slide_options=slide_options(args),
            uncertainty=args.uncertainty,
            scheduler=args.scheduler,
            n_workers=args.n_workers,
            # RCTD writes each finished chunk beside the output, so a killed run restarted alike resumes
            partial_store=api.partial_store_path(out_path) if info.name in api.RESUMABLE_METHODS else None,
        )
    except PiecesFailed as exc:  # the other spots' result is still written, then the error
        if exc.partial is None:
            raise
        failure, run = exc, exc.partial
    finally:
        progress.close()
    if not args.quiet:
        for notice in run.notices:
            print(f"notice: {notice}", file=sys.stderr)
    api.save_result(
        run.adata,
        out_path,
        protect=(args.spatial, args.reference),
        source=args.spatial,
        table=args.table,
        counts=args.with_counts,
    )
    key = run.result.key
    if args.csv:
        from .io.write import write_text_atomic

        write_text_atomic(run.adata.obsm[keys.proportions(key)].to_csv(), args.csv)
    if run.partial_store is not None and failure is None:  # kept when chunks were lost: a rerun fits only those
        run.partial_store.remove()
    summary = {
        "method": run.result.method,
        "mode": run.result.mode,
        "output": str(out_path),
        "n_spots": int(run.adata.n_obs),
        "n_fitted": int(run.result.fitted.sum()),
        "cell_types": list(run.result.cell_types),
        "device": run.result.device,
        "notices": run.notices,
        "runtime_s": round(run.result.runtime_s, 3),
        "dominant_type_counts": run.adata.obs[keys.dominant_type(key)].value_counts().to_dict(),
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif not args.quiet:
        print(
            f"{summary['method']} ({summary['mode']}): {summary['n_fitted']}/{summary['n_spots']} spots fitted "
            f"in {summary['runtime_s']} s on {summary['device']}; wrote {out_path}",
            file=sys.stderr,
        )
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_consensus(args) -> int:
    from . import api

    out_path = api.check_output(Path(args.output), *args.results)
    run = api.consensus(args.results, key=args.key, align_types=args.align_types, weighting=args.weighting)
    api.save_result(run.adata, out_path, protect=tuple(args.results))
    agreement = run.adata.obs[keys.CONSENSUS_AGREEMENT].to_numpy(dtype=float)
    summary = {
        "output": str(out_path),
        "inputs": list(run.result.params["inputs"]),
        "weighting": run.result.params["weighting"],
        "cell_types": list(run.result.cell_types),
        "dropped_types": list(run.result.params["dropped_types"]),
        "interval": keys.proportions_lower(keys.CONSENSUS) in run.adata.obsm,
        "n_spots": int(run.adata.n_obs),
        "median_agreement": round(float(np.nanmedian(agreement)), 4) if np.isfinite(agreement).any() else None,
        "type_agreement": run.adata.uns[keys.CONSENSUS_TYPE_AGREEMENT]["agreement"].round(4).to_dict(),
        "notices": run.notices,
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif not args.quiet:
        for notice in run.notices:
            print(f"notice: {notice}", file=sys.stderr)
        print(
            f"consensus of {', '.join(summary['inputs'])} ({api.weighting_phrase(summary['weighting'])}): "
            f"median agreement {summary['median_agreement']}; wrote {out_path}",
            file=sys.stderr,
        )
    return EXIT_OK


def default_output(spatial: Path, method: str) -> Path:
    """``<slide>_<method>.h5ad`` beside the input; a Space Ranger ``outs/`` is named after its run folder."""
    spatial = spatial.resolve()
    if spatial.is_dir():
        named = spatial.parent if spatial.name == "outs" else spatial
        return named.parent / f"{named.name.removesuffix('.zarr')}_{method}.h5ad"
    return spatial.with_name(f"{spatial.stem}_{method}.h5ad")


def _cmd_demo(args) -> int:
    # The GUI sits above the CLI: the demo runs as its own module in a child process, so no import runs up.
    argv = [sys.executable, "-m", "spatial_deconv_gui.gui.demo"]
    argv += ["--headless", args.headless] if args.headless else []
    argv += ["--method", args.method] if args.method else []
    return subprocess.call(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _base_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "info":
            return _cmd_info(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "run":
            return _cmd_run(args, extra)
        if args.command == "consensus":
            return _cmd_consensus(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "perturb":
            from .perturb_cli import run_perturb_command

            return run_perturb_command(args)
    except (InputError, ValueError) as exc:  # engines raise ValueError for data they cannot fit
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
