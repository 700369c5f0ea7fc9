"""Prior knowledge tables: TF -> target, ligand -> receptor, ligand -> TF.

Users bring their own files (parquet, CSV or TSV). Column names are recognised from the common conventions
(DoRothEA / CollecTRI ``tf, target``; ``source, target``; CellChat ``ligand_genes, receptor_genes``; LIANA
``source_genesymbol, target_genesymbol``; SpaceTravLR ``ligand, receptor, signaling``) and can be named
explicitly. Multi-subunit complexes written as ``A_B`` are expanded into every ligand x receptor subunit pair.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ...io.errors import InputError

GRN_TF_COLUMNS = ("tf", "source", "regulator", "tf_gene", "source_genesymbol", "from")
GRN_TARGET_COLUMNS = ("target", "target_gene", "target_genesymbol", "to", "gene")
LR_LIGAND_COLUMNS = ("ligand_genes", "source_genesymbol", "ligand", "ligand_gene", "ligand_symbol", "source")
LR_RECEPTOR_COLUMNS = ("receptor_genes", "target_genesymbol", "receptor", "receptor_gene", "receptor_symbol", "target")
LR_ANNOTATION_COLUMNS = ("annotation", "signaling", "signalling", "interaction_type", "type")
TFL_LIGAND_COLUMNS = ("ligand", "source", "ligand_gene")
TFL_TF_COLUMNS = ("tf", "target", "regulator", "tf_gene")
TFL_WEIGHT_COLUMNS = ("weight", "score", "value", "regulatory_potential")

SECRETED, CONTACT = "secreted", "contact"


def file_checksum(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a parquet / CSV / TSV table; any failure becomes an :class:`InputError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"prior table {p} does not exist.", "check the path.", code="missing_file")
    suffix = "".join(p.suffixes[-2:]).lower()
    try:
        if suffix.endswith(".parquet") or suffix.endswith(".pq"):
            return pd.read_parquet(p)
        if suffix.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            return pd.read_csv(p, sep="\t")
        if suffix.endswith((".csv", ".csv.gz")):
            return pd.read_csv(p)
        # unknown extension: try parquet, then CSV with delimiter sniffing
        try:
            return pd.read_parquet(p)
        except Exception:
            return pd.read_csv(p, sep=None, engine="python")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"could not read the table {p.name} ({type(exc).__name__}: {exc}).",
            "give a parquet, CSV or TSV file.",
            code="bad_table",
        ) from exc


def _pick(
    df: pd.DataFrame,
    explicit: str | None,
    candidates,
    what: str,
    path_name: str,
    exclude: tuple[str, ...] = (),
    required: bool = True,
) -> str | None:
    """The column named ``explicit`` (which must exist), else the first of ``candidates`` present (any case);
    when none is, an error naming the columns found, or None for an optional column."""
    cols = list(df.columns)
    if explicit is not None:
        if explicit not in df.columns:
            raise InputError(
                f"{path_name} has no column {explicit!r} for the {what}; columns found: {cols}.",
                f"name one of {cols}.",
                code="bad_table_columns",
            )
        return explicit
    lower = {str(c).lower(): c for c in cols}
    for cand in candidates:
        if cand in lower and lower[cand] not in exclude:
            return lower[cand]
    if not required:
        return None
    raise InputError(
        f"{path_name}: cannot tell which column holds the {what}; columns found: {cols}.",
        f"name it explicitly (one of {cols}).",
        code="bad_table_columns",
    )


def _as_frame(src, path_name: str = "table") -> tuple[pd.DataFrame, str, str | None]:
    """(frame, display name, checksum or None) from a path or a DataFrame."""
    if isinstance(src, pd.DataFrame):
        return src, path_name, None
    return read_table(src), Path(src).name, file_checksum(src)


def _split(value) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [g for g in str(value).replace(":", "_").replace("+", "_").split("_") if g and g.lower() != "nan"]


def load_grn(src, tf_col: str | None = None, target_col: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """TF -> target table as ``DataFrame[tf, target]`` (deduplicated), and the file checksum."""
    df, name, checksum = _as_frame(src, "GRN table")
    tf = _pick(df, tf_col, GRN_TF_COLUMNS, "transcription factors", name)
    tg = _pick(df, target_col, GRN_TARGET_COLUMNS, "targets", name, exclude=(tf,))
    out = pd.DataFrame({"tf": df[tf].astype(str).to_numpy(), "target": df[tg].astype(str).to_numpy()})
    out = out[(out.tf != out.target)].drop_duplicates().reset_index(drop=True)
    if out.empty:
        raise InputError(f"{name} has no TF -> target rows.", "check the file.", code="empty_table")
    return out, checksum


def load_lr(
    src,
    ligand_col: str | None = None,
    receptor_col: str | None = None,
    annotation_col: str | None = None,
    resource: str | None = None,
    secreted_pattern: str = "secreted",
) -> tuple[pd.DataFrame, str | None]:
    """Ligand-receptor table as ``DataFrame[ligand, receptor, signaling]`` with complexes expanded.

    ``signaling`` is ``'secreted'`` when the annotation column contains ``secreted_pattern`` (CellChat's
    "Secreted Signaling"), else ``'contact'`` (cell-cell contact, ECM-receptor, ...); with no annotation column
    every pair counts as secreted. ``resource`` filters LIANA's ``resource`` column (e.g. ``mouseconsensus``).
    Row order is kept (the first pair of a ligand sets its radius, as in SpaceTravLR).
    """
    df, name, checksum = _as_frame(src, "ligand-receptor table")
    if resource is not None:
        if "resource" not in df.columns:
            raise InputError(
                f"{name} has no 'resource' column to filter on; columns found: {list(df.columns)}.",
                "drop the resource option.",
                code="bad_table_columns",
            )
        df = df[df["resource"].astype(str) == resource]
        if df.empty:
            raise InputError(
                f"{name} has no rows for resource {resource!r}.", "pick another resource.", code="empty_table"
            )
    lig = _pick(df, ligand_col, LR_LIGAND_COLUMNS, "ligands", name)
    rec = _pick(df, receptor_col, LR_RECEPTOR_COLUMNS, "receptors", name, exclude=(lig,))
    ann = _pick(df, annotation_col, LR_ANNOTATION_COLUMNS, "annotation", name, required=False)
    rows = []
    ligs = df[lig].to_numpy()
    recs = df[rec].to_numpy()
    anns = df[ann].astype(str).str.lower().to_numpy() if ann is not None else None
    for i in range(len(df)):
        kind = SECRETED if anns is None or secreted_pattern in anns[i] else CONTACT
        for lg in _split(ligs[i]):
            for rc in _split(recs[i]):
                rows.append((lg, rc, kind))
    out = pd.DataFrame(rows, columns=["ligand", "receptor", "signaling"])
    out = out[out.ligand != out.receptor].drop_duplicates(subset=["ligand", "receptor"]).reset_index(drop=True)
    if out.empty:
        raise InputError(f"{name} has no ligand-receptor rows.", "check the file.", code="empty_table")
    return out, checksum


def load_tfl(
    src, ligand_col: str | None = None, tf_col: str | None = None, weight_col: str | None = None
) -> tuple[pd.DataFrame, str | None]:
    """Ligand -> TF links as ``DataFrame[ligand, tf, weight]`` (long form; weight 1 when absent)."""
    df, name, checksum = _as_frame(src, "ligand-TF table")
    lig = _pick(df, ligand_col, TFL_LIGAND_COLUMNS, "ligands", name)
    tf = _pick(df, tf_col, TFL_TF_COLUMNS, "transcription factors", name, exclude=(lig,))
    wcol = _pick(df, weight_col, TFL_WEIGHT_COLUMNS, "weights", name, required=False)
    w = df[wcol].astype(float).to_numpy() if wcol is not None else np.ones(len(df))
    out = pd.DataFrame({"ligand": df[lig].astype(str).to_numpy(), "tf": df[tf].astype(str).to_numpy(), "weight": w})
    return out.drop_duplicates(subset=["ligand", "tf"]).reset_index(drop=True), checksum


# Below this share of the genes in common (of the smaller gene list: the prior's, or the slide's), training refuses
# to start: the priors and the slide name genes differently (another species, Ensembl ids against symbols).
MIN_PRIOR_OVERLAP = 0.05
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def _kind_of_names(names) -> str:
    """'ensembl', 'upper' (human-style symbols), 'title' (mouse-style symbols) or 'mixed', by majority."""
    names = [str(n) for n in names][:5000]
    if not names:
        return "mixed"
    n = len(names)
    if sum(bool(_ENSEMBL.match(x)) for x in names) > 0.5 * n:
        return "ensembl"
    letters = [x for x in names if any(c.isalpha() for c in x)]
    if not letters:
        return "mixed"
    if sum(x == x.upper() for x in letters) > 0.8 * len(letters):
        return "upper"
    if sum(x[:1].isupper() and x[1:] != x[1:].upper() for x in letters) > 0.6 * len(letters):
        return "title"
    return "mixed"


def prior_overlap(var_names, tables: dict[str, set[str]]) -> dict[str, tuple[int, int]]:
    """{prior name: (its genes measured on the slide, its genes)}."""
    vs = set(map(str, var_names))
    return {k: (len(g & vs), len(g)) for k, g in tables.items() if g}


def check_prior_overlap(var_names, tables: dict[str, set[str]], min_fraction: float = MIN_PRIOR_OVERLAP) -> dict:
    """Refuse priors that barely name the slide's genes, with the counts and the likely cause; returns the
    overlap counts (for the run record)."""
    counts = prior_overlap(var_names, tables)
    n_var = len(set(map(str, var_names)))
    # relative to the smaller side: a 300-gene panel names few of a genome-wide prior's genes, and that is fine
    bad = {k: c for k, c in counts.items() if c[0] < max(1, min_fraction * min(c[1], n_var))}
    if not bad:
        return counts
    var_kind = _kind_of_names(var_names)
    prior_genes = set().union(*[tables[k] for k in bad])
    prior_kind = _kind_of_names(sorted(prior_genes))
    vs_upper = {str(v).upper() for v in var_names}
    case_hits = sum(g.upper() in vs_upper for g in prior_genes)
    if var_kind == "ensembl" and prior_kind != "ensembl":
        cause = (
            f"the slide's genes are Ensembl ids (e.g. {next(iter(var_names))}) while the priors use gene symbols",
            "name the slide's genes by symbol (for a Space Ranger slide they are in var['gene_symbols'] or the "
            "features file), or convert the priors to Ensembl ids.",
        )
    elif prior_kind == "ensembl" and var_kind != "ensembl":
        cause = (
            "the priors name genes by Ensembl id while the slide uses gene symbols",
            "use prior tables with gene symbols.",
        )
    elif {var_kind, prior_kind} == {"upper", "title"} or case_hits > 2 * max(1, sum(c[0] for c in bad.values())):
        species = {"upper": "human", "title": "mouse"}
        cause = (
            f"the slide's symbols look {species.get(var_kind, 'other')}-style and the priors' "
            f"{species.get(prior_kind, 'other')}-style ({case_hits} of the priors' genes match when case is "
            "ignored): the priors are probably for another species",
            "use the priors of the slide's species (e.g. grn_dorothea_mouse / lr_cellchatdb_mouse for a mouse slide).",
        )
    else:
        cause = (
            "the priors and the slide name few genes in common",
            "check that the priors are for this species and use the same gene naming as the slide.",
        )
    detail = "; ".join(
        f"{k}: {c[0]:,} of its {c[1]:,} genes are measured on the slide ({100 * c[0] / c[1]:.1f} %)"
        for k, c in bad.items()
    )
    raise InputError(
        f"the priors barely match the slide's {len(set(map(str, var_names))):,} genes ({detail}); likely cause: "
        f"{cause[0]}.",
        cause[1],
        code="prior_overlap",
    )
