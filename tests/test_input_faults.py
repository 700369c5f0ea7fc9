"""Bad inputs, generated: every method either refuses with one clear message or answers with finite proportions,
and never changes its inputs (issue #20, items 1 and 6).

Hypothesis draws small slides and references and mixes the faults in (NaN / Inf / negative / fractional / huge
counts, spots without counts, no spots, no genes, NaN coordinates, duplicated names, a cell-type column that is
empty, blank or holds tiny types). The examples are derandomised (the same ones on every run) and few, with no
per-example deadline: a loaded two-core CI box is slow, and speed is not what is tested here.
"""

from __future__ import annotations

import importlib
import traceback

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from spatial_deconv_gui import api, keys, perturb_api
from spatial_deconv_gui.cli import main
from spatial_deconv_gui.engines import registry
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors
from spatial_deconv_gui.io import InputError, validate
from spatial_deconv_gui.perturb_cli import main as perturb_main

FAULTS = (
    "empty_spots",
    "all_spots_empty",
    "no_spots",
    "no_genes",
    "nan_count",
    "inf_count",
    "negative_count",
    "fractional_count",
    "huge_count",
    "nan_coordinate",
    "inf_coordinate",
    "duplicated_spot",
    "duplicated_gene",
    "labels_all_nan",
    "labels_blank",
    "some_labels_missing",
    "tiny_types",
    "reference_nan_count",
)

# tiny inputs: each method's options are set so that a healthy slide of ~20 spots is fitted, quickly
FAST = {
    "flash": {},
    "rctd": {
        "mode": "full",
        "umi_min": 1,
        "counts_min": 1,
        "umi_min_sigma": 1,
        "cell_min": 1,
        "ref_umi_min": 1,
    },
    "c2l": {"max_epochs": 20, "signatures": "means"},
    "destvi": {"sc_epochs": 2, "max_epochs": 3},
}

PROPERTY = settings(
    max_examples=24,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def rctd_table_cache(tmp_path_factory):
    """RCTD's likelihood tables cached for this module only (the user's cache is left alone)."""
    FAST["rctd"]["cache_dir"] = str(tmp_path_factory.mktemp("rctd_tables"))
    yield
    del FAST["rctd"]["cache_dir"]


def make_pair(seed: int, n_spots: int, n_genes: int, n_types: int, cells_per_type: int):
    """A healthy slide and reference with known cell-type profiles (Poisson counts)."""
    rng = np.random.default_rng(seed)
    profiles = rng.gamma(1.0, 1.0, size=(n_types, n_genes)) * 3 + 0.05
    labels = np.repeat(np.arange(n_types), cells_per_type)
    genes = [f"G{i}" for i in range(n_genes)]
    reference = ad.AnnData(
        sp.csr_matrix(rng.poisson(profiles[labels]).astype(np.float32)),
        obs=pd.DataFrame(
            {keys.CELL_TYPE: pd.Categorical([f"T{i}" for i in labels])},
            index=[f"cell{i}" for i in range(len(labels))],
        ),
        var=pd.DataFrame(index=genes),
    )
    mix = rng.dirichlet(np.ones(n_types), size=n_spots)
    slide = ad.AnnData(
        sp.csr_matrix(rng.poisson(mix @ profiles * 12).astype(np.float32)),
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(n_spots)]),
        var=pd.DataFrame(index=genes),
    )
    slide.obsm[keys.SPATIAL] = rng.uniform(0, 100, size=(n_spots, 2))
    return slide, reference


def apply_faults(slide: ad.AnnData, reference: ad.AnnData, faults: set[str], rng) -> tuple[ad.AnnData, ad.AnnData]:
    slide, reference = slide.copy(), reference.copy()
    x = slide.X.toarray().astype(np.float64)
    n = x.shape[0]
    spot, gene = int(rng.integers(n)), int(rng.integers(x.shape[1]))
    if "empty_spots" in faults:
        x[rng.choice(n, size=max(1, n // 4), replace=False)] = 0
    if "all_spots_empty" in faults:
        x[:] = 0
    for fault, value in (
        ("nan_count", np.nan),
        ("inf_count", np.inf),
        ("negative_count", -2.0),
        ("fractional_count", 0.5),
        ("huge_count", 2.0**40),
    ):
        if fault in faults:
            x[spot, gene] = value
    slide.X = sp.csr_matrix(x)
    coords = slide.obsm[keys.SPATIAL].copy()
    if "nan_coordinate" in faults:
        coords[spot, 0] = np.nan
    if "inf_coordinate" in faults:
        coords[(spot + 1) % n, 1] = np.inf
    slide.obsm[keys.SPATIAL] = coords
    if "duplicated_spot" in faults and n > 1:
        slide.obs_names = [slide.obs_names[1], *slide.obs_names[1:]]
    if "duplicated_gene" in faults:
        slide.var_names = [slide.var_names[1], *slide.var_names[1:]]
    labels = reference.obs[keys.CELL_TYPE].astype(object).to_numpy()
    if "some_labels_missing" in faults:
        labels[:: max(2, len(labels) // 3)] = None
    if "tiny_types" in faults:
        labels[:2] = "Rare"
    if "labels_blank" in faults:
        labels[:] = ""
    reference.obs[keys.CELL_TYPE] = pd.Categorical(labels)
    if "labels_all_nan" in faults:
        reference.obs[keys.CELL_TYPE] = np.nan
    if "reference_nan_count" in faults:
        rx = reference.X.toarray()
        rx[0, 0] = np.nan
        reference.X = sp.csr_matrix(rx)
    if "no_spots" in faults:
        slide = slide[:0].copy()
    if "no_genes" in faults:
        slide = slide[:, :0].copy()
    return slide, reference


def snapshot(adata: ad.AnnData) -> dict:
    """Everything a run could change in place."""
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    return {
        "X": x.copy(),
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "layers": sorted(adata.layers.keys()),
        "uns": sorted(adata.uns.keys()),
    }


def assert_unchanged(adata: ad.AnnData, before: dict):
    now = snapshot(adata)
    np.testing.assert_array_equal(now["X"], before["X"])
    pd.testing.assert_frame_equal(now["obs"], before["obs"])
    pd.testing.assert_frame_equal(now["var"], before["var"])
    assert now["obsm"].keys() == before["obsm"].keys()
    for k in now["obsm"]:
        np.testing.assert_array_equal(now["obsm"][k], before["obsm"][k])
    assert now["layers"] == before["layers"] and now["uns"] == before["uns"]


def event(label: str):
    """Count outcomes in hypothesis' statistics (--hypothesis-show-statistics); a no-op outside a property."""

    try:
        hypothesis_event(label)
    except InvalidArgument:
        pass


def our_own_refusal(exc: BaseException) -> bool:
    """A refusal we raised on purpose: an InputError, or an engine's ValueError raised in our code with a
    sentence for the user (not numpy's or torch's own error escaping from deep inside)."""
    if isinstance(exc, InputError):
        return bool(exc.problem)
    if type(exc) is not ValueError or not str(exc):
        return False
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return "spatial_deconv_gui" in last.filename


def check_one(method: str, slide: ad.AnnData, reference: ad.AnnData, faults: set[str]):
    slide_before, reference_before = snapshot(slide), snapshot(reference)

    report = validate(slide, reference, min_cells_per_type=1)
    blocking = [p.code for p in report.problems if p.severity == "error"]
    try:
        run = api.run_deconvolution(slide, reference, method, params=dict(FAST[method]))
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions come out
        event(f"refused: {type(exc).__name__} {getattr(exc, 'code', '')}")
        assert our_own_refusal(exc), f"{faults}: {type(exc).__name__}: {exc}"
        if blocking:  # the run refuses on the same grounds as validate, first problem first
            assert isinstance(exc, InputError) and exc.code == blocking[0], (blocking, exc.code)
    else:
        event("answered")
        assert not blocking, f"{faults}: validate reported {blocking} but the run went ahead"
        props = run.adata.obsm[keys.proportions(run.result.key)].to_numpy()
        empty = np.asarray(abs(slide.X).sum(axis=1)).ravel() == 0
        assert props.shape == (slide.n_obs, len(run.result.cell_types))
        # spots without counts are NaN rows; every other row is finite (or NaN as a whole: filtered by the method)
        assert np.isnan(props[empty]).all()
        rows = props[~empty]
        fitted = ~np.isnan(rows).any(axis=1)
        assert np.isfinite(rows[fitted]).all() and not np.isnan(rows[~fitted]).sum() % rows.shape[1]
        np.testing.assert_allclose(rows[fitted].sum(axis=1), 1.0, atol=1e-6)
        assert fitted.any()
        if empty.any():
            assert any("no counts at all" in n for n in run.notices)
        if (~fitted).any():  # spots the method filtered out are never a silent NaN
            assert any(f"did not fit {int((~fitted).sum())} of" in n for n in run.notices), run.notices
        assert not {"nan_count", "inf_count", "huge_count", "no_spots", "all_spots_empty"} & faults
    assert_unchanged(slide, slide_before)
    assert_unchanged(reference, reference_before)


fault_sets = st.sets(st.sampled_from(FAULTS), min_size=1, max_size=3)


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    n_spots=st.integers(6, 24),
    n_genes=st.integers(8, 30),
    n_types=st.integers(2, 3),
    cells_per_type=st.integers(3, 12),
    faults=fault_sets,
)
def test_flash_refuses_clearly_or_answers_finite(seed, n_spots, n_genes, n_types, cells_per_type, faults):
    slide, reference = make_pair(seed, n_spots, n_genes, n_types, cells_per_type)
    slide, reference = apply_faults(slide, reference, faults, np.random.default_rng(seed))
    check_one("flash", slide, reference, faults)


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_alone(fault):
    # every fault is tried at least once, whatever the generator draws
    slide, reference = make_pair(11, 18, 20, 2, 10)
    slide, reference = apply_faults(slide, reference, {fault}, np.random.default_rng(11))
    check_one("flash", slide, reference, {fault})


@pytest.mark.parametrize("method", ["rctd", "c2l", "destvi"])
@pytest.mark.parametrize("faults", [("empty_spots",), ("some_labels_missing",), ("tiny_types", "empty_spots")])
def test_faults_that_reach_the_engine(method, faults, one_thread):
    # the faults validation lets through (with a notice) reach each engine, which must answer finitely
    slide, reference = make_pair(5, 16, 20, 2, 10)
    slide, reference = apply_faults(slide, reference, set(faults), np.random.default_rng(5))
    check_one(method, slide, reference, set(faults))


@pytest.mark.parametrize("method", ["rctd", "c2l", "destvi"])
def test_every_method_refuses_clearly_or_answers_finite(method, one_thread):
    # fewer examples for the slower methods: the same property, the same fault generator
    @settings(PROPERTY, max_examples=5)
    @given(seed=st.integers(0, 2**16), faults=fault_sets)
    def prop(seed, faults):
        slide, reference = make_pair(seed, 16, 20, 2, 10)
        slide, reference = apply_faults(slide, reference, faults, np.random.default_rng(seed))
        check_one(method, slide, reference, faults)

    prop()


@pytest.mark.parametrize("method", ["flash", "rctd", "c2l", "destvi"])
def test_spots_without_counts_are_nan_rows_for_every_method(method, one_thread):
    slide, reference = make_pair(7, 20, 24, 2, 12)
    x = slide.X.toarray()
    x[[2, 11]] = 0
    slide.X = sp.csr_matrix(x)
    partial_spots = []

    def progress(event):
        if event.partial is not None:
            partial_spots.extend(event.partial.spot_index.tolist())

    run = api.run_deconvolution(slide, reference, method, params=dict(FAST[method]), progress=progress)
    props = run.adata.obsm[keys.proportions(run.result.key)].to_numpy()
    assert np.flatnonzero(np.isnan(props).any(axis=1)).tolist() == [2, 11]
    assert run.adata.obs[keys.dominant_type(run.result.key)].iloc[[2, 11]].tolist() == ["filtered"] * 2
    assert (
        "2 of 20 spot(s) have no counts at all; they are left out of the fit and kept in the result as NaN rows."
        in run.notices
    )
    # streamed partial results index the whole slide, so the GUI colours the right spots
    assert not {2, 11} & set(partial_spots) and set(partial_spots) <= set(range(20))
    # the spots that were fitted get what a run on the slide without the empty spots gives
    kept = np.setdiff1d(np.arange(20), [2, 11])
    alone = api.run_deconvolution(slide[kept].copy(), reference, method, params=dict(FAST[method]))
    np.testing.assert_allclose(props[kept], alone.result.proportions, rtol=1e-6, atol=1e-9)
    for name, value in run.adata.obsm.items():  # every per-spot table has a row for every spot
        assert len(value) == 20, name


def test_huge_count_is_refused_by_every_entry_point(small_pair, tmp_path, capsys):
    slide, reference = small_pair
    bad = slide.copy()
    x = bad.X.astype(np.float64).tocsr()
    x.data[0] = 2.0**40
    bad.X = x
    with pytest.raises(InputError) as err:
        api.run_deconvolution(bad, reference, "flash")
    assert err.value.code == "huge_counts"
    bad.write_h5ad(tmp_path / "s.h5ad")
    reference.write_h5ad(tmp_path / "r.h5ad")
    code = main(["run", str(tmp_path / "s.h5ad"), str(tmp_path / "r.h5ad"), "--method", "flash", "-q"])
    err_text = capsys.readouterr().err
    assert code == 2 and "above 16,777,216" in err_text and "Traceback" not in err_text
    assert not (tmp_path / "s_flash.h5ad").exists()


# ---- one validation path: run, perturb train and the API all go through io.validate -----------------------


@pytest.fixture(scope="module")
def grn_tissue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grn")
    tissue = simulate_grn_tissue(n_cells=120, seed=2)
    return tissue, write_simulated_priors(tissue, folder)


@pytest.mark.parametrize(
    "fault, code",
    [
        ("nan_count", "nan_counts"),
        ("no_cells", "no_spots"),
        ("duplicated_cell", "duplicated_obs_names"),
        ("nan_coordinate", "nan_coordinates"),
    ],
)
def test_perturb_train_refuses_through_the_same_validation(grn_tissue, tmp_path, monkeypatch, capsys, fault, code):
    tissue, priors = grn_tissue
    bad = tissue.copy()
    if fault == "nan_count":
        x = np.asarray(bad.X.toarray() if sp.issparse(bad.X) else bad.X, dtype=float)
        x[3, 2] = np.nan
        bad.X = x
    elif fault == "no_cells":
        bad = bad[:0].copy()
    elif fault == "duplicated_cell":
        bad.obs_names = [bad.obs_names[1], *bad.obs_names[1:]]
    else:
        bad.obsm[keys.SPATIAL] = np.asarray(bad.obsm[keys.SPATIAL], dtype=float)
        bad.obsm[keys.SPATIAL][4, 0] = np.nan
    calls = []
    real_validate = perturb_api.validate
    monkeypatch.setattr(perturb_api, "validate", lambda *a, **k: calls.append(k) or real_validate(*a, **k))
    with pytest.raises(InputError) as err:
        perturb_api.train_model(bad, priors["grn_prior"], priors["lr_prior"], "cluster", tmp_path / "model")
    assert err.value.code == code and calls and calls[0]["counts"] is False
    assert not (tmp_path / "model").exists()  # refused before any work
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    argv = ["perturb", "train", str(path), "--grn", priors["grn_prior"], "--lr", priors["lr_prior"]]
    rc = perturb_main([*argv, "--cluster-col", "cluster", "--out", str(tmp_path / "model2"), "--quiet"])
    text = capsys.readouterr().err
    assert rc == 2 and "Fix:" in text and "Traceback" not in text
    assert not (tmp_path / "model2").exists()


def test_run_goes_through_the_same_validation(small_pair, monkeypatch):
    calls = []
    real_validate = api.validate
    monkeypatch.setattr(api, "validate", lambda *a, **k: calls.append(a) or real_validate(*a, **k))
    slide, reference = small_pair
    api.run_deconvolution(slide, reference, "flash", params={"n_threads": 1})
    assert len(calls) == 1 and calls[0][0] is slide and calls[0][1] is reference


def test_a_truncated_reference_is_one_clear_error_in_run(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    cut = tmp_path / "cut.h5ad"
    data = r.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.h5ad"
    code = main(["run", str(s), str(cut), "--method", "flash", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cut.h5ad is an HDF5 file but not a readable AnnData" in err
    assert "Traceback" not in err and not out.exists()


def test_a_partly_nan_answer_stops_the_run_naming_the_spots(small_pair, monkeypatch):
    info = registry.get_method("flash")
    module = importlib.import_module(info.module)
    real_runner = getattr(module, info.runner)

    def runner(*args, **kwargs):
        result = real_runner(*args, **kwargs)
        result.proportions[4, 1] = np.nan  # one value of one spot: a failed fit, not a filtered spot
        result.proportions[9, 0] = np.inf
        return result

    monkeypatch.setattr(module, info.runner, runner)
    slide, reference = small_pair
    with pytest.raises(InputError) as err:
        api.run_deconvolution(slide, reference, "flash", params={"n_threads": 1})
    assert err.value.code == "non_finite_result"
    names = ", ".join(slide.obs_names[[4, 9]])
    assert f"flash gave NaN or infinite proportions for 2 spot(s) (e.g. {names})" in str(err.value)


def test_spots_a_method_filters_out_come_with_a_notice(small_pair):
    slide, reference = small_pair
    totals = slide.obs[keys.NUMI].to_numpy()  # what RCTD filters on
    threshold = float(np.sort(totals)[10])  # RCTD's --umi-min leaves the 10 smallest spots out
    params = {"mode": "full", "umi_min": threshold, "sigma_override": 0.84, "cache_dir": FAST["rctd"]["cache_dir"]}
    run = api.run_deconvolution(slide, reference, "rctd", params=params)
    n = int((totals < threshold).sum())
    assert n >= 10
    assert any(n_.startswith(f"RCTD did not fit {n} of 300 spot(s) (below its filters") for n_ in run.notices)
    props = run.adata.obsm["rctd_proportions"].to_numpy()
    assert int(np.isnan(props).all(axis=1).sum()) == n


# -- the widgets, with files, as a user meets them -----------------------------------------------------------------
WIDGET_FAULTS = {  # fault -> what the Deconvolution dock's problem list says
    "all_spots_empty": "have no counts at all",
    "no_genes": "the file has no genes",
    "nan_count": "1 NaN and 0 infinite",
    "negative_count": "1 negative value",
    "fractional_count": "1 non-integer value",
    "huge_count": "above 16,777,216",
    "duplicated_spot": "duplicated obs name",
    "duplicated_gene": "duplicated var name",
    "labels_all_nan": "holds no cell types",
    "reference_nan_count": "[reference] X holds 1 NaN",
    "truncated_reference": "not a readable AnnData",
}


def _fault_files(tmp_path, fault: str):
    import hashlib

    slide, reference = apply_faults(*make_pair(1, 30, 40, 3, 20), {fault} & set(FAULTS), np.random.default_rng(0))
    paths = tmp_path / f"{fault}_slide.h5ad", tmp_path / f"{fault}_reference.h5ad"
    slide.write_h5ad(paths[0])
    reference.write_h5ad(paths[1])
    if fault == "truncated_reference":
        data = paths[1].read_bytes()
        paths[1].write_bytes(data[: len(data) // 2])
    return paths, [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.mark.parametrize("fault", list(WIDGET_FAULTS))
def test_the_deconvolution_dock_refuses_each_fault_in_words_and_leaves_the_files(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, fault
):
    import hashlib

    from spatial_deconv_gui.gui.session import session_for

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    (slide, reference), digests = _fault_files(tmp_path, fault)
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="spatial-deconv-gui")
    layers_before = [layer.name for layer in viewer.layers]
    _, dock = viewer.window.add_plugin_dock_widget("spatial-deconv-gui", "Deconvolution")
    dock.reference.value = str(reference)
    dock.method.value = "flash"
    dock.run_btn.native.click()
    qtbot.waitUntil(lambda: not dock.busy, timeout=120_000)
    said = WIDGET_FAULTS[fault]
    assert said in dock.problems.value and "Fix:" in dock.problems.value, dock.problems.value
    assert dock.status.value.startswith("failed: ") and said in dock.status.value
    assert len(shown) == 1 and said in shown[0] and "Traceback" not in shown[0]
    assert not session_for(viewer).results and [layer.name for layer in viewer.layers] == layers_before
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in (slide, reference)] == digests


@pytest.mark.parametrize(
    "fault, said",
    [
        ("no_spots", "the file has no spots (0 x 40)"),
        ("nan_coordinate", "1 spot(s) have NaN or infinite coordinates"),
        ("inf_coordinate", "1 spot(s) have NaN or infinite coordinates"),
    ],
)
def test_opening_a_slide_that_cannot_be_drawn_is_one_clear_error(make_napari_viewer, tmp_path, fault, said):
    import hashlib

    (slide, _), digests = _fault_files(tmp_path, fault)
    viewer = make_napari_viewer()
    with pytest.raises(InputError) as info:
        viewer.open(str(slide), plugin="spatial-deconv-gui")
    assert said in str(info.value) and "Fix:" in str(info.value)
    assert len(viewer.layers) == 0 and hashlib.sha256(slide.read_bytes()).hexdigest() == digests[0]
