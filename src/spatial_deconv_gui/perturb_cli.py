"""`spatial-deconv perturb train|run|screen|upgrade`: the perturbation engine from the shell.

Hooked into :mod:`spatial_deconv_gui.cli` with ``add_perturb_parser(sub)`` and
``run_perturb_command(args)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

from . import keys
from .engines.options import add_config_flags, add_scheduler_options, given_options
from .engines.perturb.config import PerturbRunConfig, TrainConfig

EXIT_OK = 0


def _add_scope_options(parser, spatial_help: str) -> None:
    """Which cells a knockout touches (--cells | --cell-type [--cell-type-col]) and the slide it reads them from."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--cells", default=None, help="text file: one obs name or 0-based index per line")
    scope.add_argument("--cell-type", default=None, help="perturb only the cells of this cluster / type")
    parser.add_argument("--cell-type-col", default=None, help="obs column for --cell-type (needs --spatial)")
    parser.add_argument("--spatial", default=None, help=spatial_help)
    add_slide_options(parser)


def add_perturb_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("perturb", help="spatial GRN perturbation: train a model, simulate knockouts")
    sub = p.add_subparsers(dest="perturb_command", required=True)

    tr = sub.add_parser("train", help="train per-cluster TF / ligand models of each gene into MODEL_DIR")
    tr.add_argument(
        "spatial",
        help=f"slide: .h5ad (coordinates in obsm['{keys.SPATIAL}'] or --coords), Space "
        "Ranger / Visium HD / Xenium folder, or SpatialData .zarr",
    )
    add_slide_options(tr)
    tr.add_argument("--grn", required=True, help="TF -> target table (parquet/CSV/TSV)")
    tr.add_argument("--lr", default=None, help="ligand-receptor table (CellChat / LIANA / SpaceTravLR style)")
    tr.add_argument("--tfl", default=None, help="optional ligand -> TF table (ligand, tf[, weight])")
    tr.add_argument("--cluster-col", required=True, help="obs column with clusters / cell types")
    tr.add_argument("--out", required=True, help="model folder (resumes when it holds a matching model)")
    tr.add_argument("--layer", default=None, help="expression layer (default: an imputed layer, else X)")
    tr.add_argument("--coords", default=None, help="obsm key or 'xcol,ycol' obs columns")
    tr.add_argument("--impute", action="store_true", help="cluster-wise diffusion imputation before training")
    tr.add_argument("--targets", default=None, help="text file with one target gene per line (default: all)")
    tr.add_argument("--grn-tf-col", default=None)
    tr.add_argument("--grn-target-col", default=None)
    tr.add_argument("--lr-ligand-col", default=None)
    tr.add_argument("--lr-receptor-col", default=None)
    tr.add_argument("--lr-annotation-col", default=None)
    tr.add_argument("--lr-resource", default=None, help="keep only this LIANA resource (e.g. mouseconsensus)")
    # --radius, --l1-reg, --ligand-mode, --device...: one flag per TrainConfig field
    add_config_flags(tr, TrainConfig)
    tr.add_argument("--overwrite", action="store_true", help="replace a model trained on other data/settings")
    add_scheduler_options(tr, "the fits of the target genes (batches of targets as tasks)")
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--quiet", "-q", action="store_true")

    rn = sub.add_parser("run", help="simulate a knockout / overexpression with a trained model")
    rn.add_argument("model_dir")
    rn.add_argument("--gene", action="append", required=True, help="gene to perturb (repeat for several)")
    rn.add_argument(
        "--value",
        action="append",
        type=float,
        default=None,
        help="expression to set (default 0 = knockout); one, or one per --gene",
    )
    _add_scope_options(rn, spatial_help="slide to copy the result onto (default: the model's data)")
    rn.add_argument(
        "--separately",
        action="store_true",
        help="knock out each --gene on its own (one run per gene, the model loaded once) and write a Δ summary "
        "table ranked by effect to --output (.csv or .tsv); without it (the default) all --gene are perturbed "
        "together in one run and --output is the perturbed .h5ad",
    )
    rn.add_argument(
        "--moved-tol",
        type=float,
        default=1e-6,
        help="with --separately: a gene counts as moved when its |Δ| exceeds this in some cell (default 1e-6)",
    )
    rn.add_argument("--output", "-o", required=True, help="the perturbed .h5ad; with --separately the summary table")
    # --steps, --ligand-mode, --embedding, --device...: one flag per PerturbRunConfig field
    add_config_flags(rn, PerturbRunConfig)
    add_scheduler_options(rn, "the knockouts of --separately (one task each)")
    rn.add_argument("--json", action="store_true")
    rn.add_argument("--quiet", "-q", action="store_true")

    sc = sub.add_parser(
        "screen",
        help="knock out many genes (or one gene at many values), each on its own, and write a table ranked by "
        "effect; --scheduler runs the knockouts on Dask",
    )
    sc.add_argument("model_dir")
    sc.add_argument("--gene", action="append", default=None, help="gene to perturb (repeat for several)")
    sc.add_argument("--genes", default=None, help="text file with one gene per line (with or instead of --gene)")
    sc.add_argument(
        "--value",
        action="append",
        type=float,
        default=None,
        help="expression to set (default 0 = knockout): one for all genes, one per gene, or several for one gene",
    )
    _add_scope_options(sc, spatial_help="slide whose obs --cell-type-col reads (default: the model's)")
    sc.add_argument(
        "--moved-tol",
        type=float,
        default=1e-6,
        help="a gene counts as moved when its |Δ| exceeds this in some cell (default 1e-6)",
    )
    sc.add_argument("--output", "-o", required=True, help="the ranked summary table (.csv or .tsv)")
    add_config_flags(sc, PerturbRunConfig, skip=("embedding", "k", "temperature", "null", "n_grid"))
    add_scheduler_options(sc, "the knockouts (one task each)")
    sc.add_argument("--json", action="store_true")
    sc.add_argument("--quiet", "-q", action="store_true")

    up = sub.add_parser(
        "upgrade",
        help="rewrite an older model folder (one CSV per target) in place as the "
        "current format (one coefficient store, fast to load)",
    )
    up.add_argument("model_dir")
    up.add_argument("--json", action="store_true")
    up.add_argument("--quiet", "-q", action="store_true")
    return p


def add_slide_options(p: argparse.ArgumentParser):
    """How to read a slide that is not an .h5ad: which SpatialData table, which Visium HD bins."""
    p.add_argument("--table", default=None, help="SpatialData .zarr: the table to use when it has several")
    p.add_argument("--bin-size", type=int, default=8, help="Visium HD outs/ folder: bin size in µm (default 8)")


def slide_options(args) -> dict:
    options = {}
    if getattr(args, "table", None):
        options["table"] = args.table
    if getattr(args, "bin_size", 8) != 8:
        options["bin_size"] = args.bin_size
    return options


def _progress(quiet: bool):
    if quiet:
        return None

    def cb(event):
        print(
            f"\r{event.stage:<18} {100 * event.fraction:5.1f}% {event.message[:60]:<60}",
            end="",
            file=sys.stderr,
            flush=True,
        )
        if event.fraction >= 1.0:
            print(file=sys.stderr)

    return cb


def _read_lines(path) -> list[str]:
    from .io.errors import InputError

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist.", "check the path.", code="missing_file")
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]


def _train_folder(api, args, targets, params) -> dict:
    # the command prints a summary only: the model is not built (nor read back) after training
    return api.train_model_dir(
        args.spatial,
        args.grn,
        args.lr,
        args.cluster_col,
        args.out,
        tfl=args.tfl,
        layer=args.layer,
        coord_key=args.coords,
        targets=targets,
        impute=args.impute,
        grn_columns=(args.grn_tf_col, args.grn_target_col),
        lr_columns=(args.lr_ligand_col, args.lr_receptor_col, args.lr_annotation_col),
        lr_resource=args.lr_resource,
        overwrite=args.overwrite,
        progress=_progress(args.quiet),
        slide_options=slide_options(args),
        scheduler=args.scheduler,
        n_workers=args.n_workers,
        **params,
    )


def _cmd_train(args) -> int:
    from . import perturb_api as api

    params = given_options(args, TrainConfig)
    targets = _read_lines(args.targets) if args.targets else None
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", UserWarning)
        man = _train_folder(api, args, targets, params)
    for note in notes:
        if "spatial_deconv_gui" in str(note.filename):
            print(f"note: {note.message}", file=sys.stderr)
        else:
            warnings.showwarning(note.message, note.category, note.filename, note.lineno)
    summary = {
        "model_dir": str(args.out),
        "n_cells": man["n_cells"],
        "n_targets": len(man["targets"]),
        "n_orphans": len(man["orphans"]),
        "clusters": man["clusters"],
        "radius": man["radius"],
        "contact_radius": man["contact_radius"],
        "radius_rule": man.get("radius_rule", "ligand"),
        "n_received_channels": len(man.get("received_channels", man.get("ligands", []))),
        "train_time_s": man.get("train_time_s"),
        "small_clusters": man.get("small_clusters", {}),
        "mode": man.get("mode", "seed"),
    }
    pc = man.get("percell")
    if pc:
        summary.update(
            per_cell_targets=pc["n_cnn"],
            seed_targets=pc["n_seed"],
            median_heldout_error_cut=pc["median_heldout_error_cut"],
        )
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(
            f"trained {summary['n_targets']} genes ({summary['n_orphans']} orphans without modulators) on "
            f"{summary['n_cells']} cells in {summary['train_time_s']} s; wrote {args.out}",
            file=sys.stderr,
        )
        if pc:
            print(
                f"{summary['mode']} mode: per-cell coefficients for {pc['n_cnn']} targets, the cluster seed for "
                f"{pc['n_seed']} ({pc['rule']}); held-out R² per target in the manifest's 'percell'",
                file=sys.stderr,
            )
    return EXIT_OK


def _cmd_run(args) -> int:
    from . import perturb_api as api
    from .io.errors import InputError
    from .io.slide import read_slide_adata
    from .io.write import write_h5ad_atomic

    values = args.value if args.value else [0.0]
    if len(values) == 1:
        values = values * len(args.gene)
    if len(values) != len(args.gene):
        raise InputError(
            f"{len(args.gene)} --gene but {len(values)} --value.",
            "give one value or one per gene.",
            code="bad_perturbation",
        )
    adata = read_slide_adata(args.spatial, **slide_options(args)) if args.spatial else None
    cells = None
    if args.cells:
        lines = _read_lines(args.cells)
        cells = [int(x) for x in lines] if all(x.lstrip("-").isdigit() for x in lines) else lines
    out_path = Path(args.output)
    for src in (args.spatial,):
        if src and Path(src).resolve() == out_path.resolve():
            raise InputError(
                "the output would overwrite the input slide.", "choose another --output.", code="output_is_input"
            )
    run_options = {**dataclasses.asdict(PerturbRunConfig()), **given_options(args, PerturbRunConfig)}
    device = run_options.pop("device")
    if args.separately and out_path.suffix.lower() not in (".csv", ".tsv"):
        raise InputError(
            f"--separately writes a summary table, but --output is {out_path.name}.",
            "name a .csv or .tsv file.",
            code="bad_output",
        )
    if not args.separately and out_path.suffix.lower() in (".csv", ".tsv"):
        raise InputError(
            f"--output {out_path.name} is a table, but one perturbation run writes an .h5ad.",
            "name an .h5ad, or add --separately for a summary table of one knockout per gene.",
            code="bad_output",
        )
    model = _load_with_notice(api, args.model_dir, args.quiet)  # once, for the notices and every run
    usage = api.gene_usage(model, args.gene)  # once: the notices and a screen's table both read it
    notices = api.usage_notices(model, usage=usage)
    _print_usage(api, model, notices, args)
    if args.separately:
        return _run_separately(args, api, model, values, cells, adata, run_options, device, out_path, notices, usage)
    if args.scheduler is not None:
        raise InputError(
            "one joint perturbation runs in this process: --scheduler applies to screens of separate knockouts.",
            "add --separately (or use `perturb screen`), or leave --scheduler out.",
            code="scheduler_unsupported",
        )
    res = api.run_perturbation(
        model,
        args.gene,
        values,
        cells=cells,
        cell_type=args.cell_type,
        cell_type_col=args.cell_type_col,
        adata=adata,
        device=None if device == "auto" else device,
        progress=_progress(args.quiet),
        **run_options,
    )
    write_h5ad_atomic(res, out_path)
    u = res.uns[keys.PERTURB]
    delta = res.layers[keys.PERTURB_DELTA]
    summary = {
        "output": str(out_path),
        "genes": u["genes"],
        "values": u["values"],
        "scope": u["scope"],
        "steps": u["steps"],
        "runtime_s": u["runtime_s"],
        "max_abs_delta": float(abs(delta).max()) if delta.nnz else 0.0,
        "notices": notices,
        "model_mode": model.mode,
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif not args.quiet:
        print(
            f"perturbed {', '.join(u['genes'])} in {u['scope']['n_cells']} cells, {u['steps']} steps, "
            f"{u['runtime_s']} s; wrote {out_path}",
            file=sys.stderr,
        )
    return EXIT_OK


def _print_usage(api, model, notices: list[str], args) -> None:
    """The model's mode (what its |beta| are), then one line per gene: what a knockout of it can move."""
    if not args.quiet and not args.json:
        for line in [api.usage_header(model), *notices]:
            print(line, file=sys.stderr)


def _load_with_notice(api, model_dir, quiet: bool):
    """Load the model; an older folder's notice becomes one line on stderr (not a Python warning's two)."""
    import warnings

    from .engines.perturb.model_dir import OldFormatNotice

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OldFormatNotice)
        model = api.load_model(model_dir)
    for w in caught:
        if issubclass(w.category, OldFormatNotice):
            if not quiet:
                print(f"notice: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def _run_separately(args, api, model, values, cells, adata, run_options, device, out_path, notices, usage) -> int:
    from .engines.cluster import PiecesFailed
    from .io.write import write_text_atomic

    failure = None
    try:
        table = api.knockout_screen(
            model,
            args.gene,
            values,
            cells=cells,
            cell_type=args.cell_type,
            cell_type_col=args.cell_type_col,
            steps=run_options["steps"],
            ligand_mode=run_options["ligand_mode"],
            device=None if device == "auto" else device,
            adata=adata,
            moved_tol=args.moved_tol,
            progress=_progress(args.quiet),
            scheduler=args.scheduler,
            n_workers=args.n_workers,
            usage=usage,
        )
    except PiecesFailed as exc:  # the table of the other knockouts is still written, then the error
        if exc.partial is None:
            raise
        failure, table = exc, exc.partial
    sep = "\t" if out_path.suffix.lower() == ".tsv" else ","
    write_text_atomic(table.to_csv(index=False, sep=sep, float_format="%.17g"), out_path)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    if args.json:
        summary = {"output": str(out_path), "notices": notices, "model_mode": model.mode}
        print(json.dumps({**summary, "table": table.to_dict("records")}, indent=2))
    elif not args.quiet:
        print(
            f"{len(table)} separate knockouts, {run_options['steps']} steps each; ranked by total |Δ|: "
            + ", ".join(f"{r.gene} {r.total_abs_delta:.3g}" for r in table.itertuples())
            + f"; wrote {out_path}",
            file=sys.stderr,
        )
    return EXIT_OK


def _cmd_screen(args) -> int:
    from . import perturb_api as api
    from .io.errors import InputError
    from .io.slide import read_slide_adata

    genes = list(args.gene or []) + (_read_lines(args.genes) if args.genes else [])
    if not genes:
        raise InputError("no gene to screen.", "give --gene (repeat it) or --genes FILE.", code="bad_perturbation")
    values = args.value if args.value else [0.0]
    pairs = api.screen_pairs(genes, values)
    args.gene = [g for g, _ in pairs]
    out_path = Path(args.output)
    if out_path.suffix.lower() not in (".csv", ".tsv"):
        raise InputError(
            f"perturb screen writes a summary table, but --output is {out_path.name}.",
            "name a .csv or .tsv file.",
            code="bad_output",
        )
    adata = read_slide_adata(args.spatial, **slide_options(args)) if args.spatial else None
    cells = None
    if args.cells:
        lines = _read_lines(args.cells)
        cells = [int(x) for x in lines] if all(x.lstrip("-").isdigit() for x in lines) else lines
    run_options = {**dataclasses.asdict(PerturbRunConfig()), **given_options(args, PerturbRunConfig)}
    device = run_options.pop("device")
    model = _load_with_notice(api, args.model_dir, args.quiet)
    usage = api.gene_usage(model, list(dict.fromkeys(args.gene)))
    notices = api.usage_notices(model, usage=usage)
    _print_usage(api, model, notices, args)
    return _run_separately(
        args, api, model, [v for _, v in pairs], cells, adata, run_options, device, out_path, notices, usage
    )


def _cmd_upgrade(args) -> int:
    from .engines.perturb import model_dir as md

    summary = md.upgrade(args.model_dir)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        if summary["upgraded"]:
            print(
                f"upgraded {args.model_dir} from format {summary['from_format']} to {summary['format_version']}: "
                f"{summary['n_targets']} targets in {summary['store']} ({summary['store_bytes']} bytes)",
                file=sys.stderr,
            )
        elif summary.get("file_checksums_recorded"):
            print(
                f"{args.model_dir} is already format {summary['format_version']}; recorded the checksums of its "
                "data files in the manifest",
                file=sys.stderr,
            )
        else:
            print(f"{args.model_dir} is already format {summary['format_version']}; nothing to do", file=sys.stderr)
    return EXIT_OK


def run_perturb_command(args) -> int:
    """Dispatch ``spatial-deconv perturb ...`` (InputError propagates to the main CLI's handler)."""
    if args.perturb_command == "train":
        return _cmd_train(args)
    if args.perturb_command == "upgrade":
        return _cmd_upgrade(args)
    if args.perturb_command == "screen":
        return _cmd_screen(args)
    return _cmd_run(args)


def main(argv=None) -> int:
    """Stand-alone entry (``python -m spatial_deconv_gui.perturb_cli perturb ...``) for testing."""
    from .io.errors import InputError

    parser = argparse.ArgumentParser(prog="spatial-deconv")
    add_perturb_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_perturb_command(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
