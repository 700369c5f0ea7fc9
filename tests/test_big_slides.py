"""Slides read by chunks of spots (issue 19 item 3), the one-pass count checks and the results-only output
(item 4)."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_deconv_gui import api
from spatial_deconv_gui.cli import main
from spatial_deconv_gui.engines.rctd.likelihood import build_tables
from spatial_deconv_gui.io import InputError
from spatial_deconv_gui.io.chunked import ChunkedCounts, from_group, from_matrix, open_counts, open_lazy_slide
from spatial_deconv_gui.io.count_stats import CountStats, count_stats
from spatial_deconv_gui.simulate import write_binned_slide


# -- the one-pass count checks -------------------------------------------------------------------------------
def test_count_stats_counts_each_kind_of_bad_value_by_hand():
    x = sp.csr_matrix(
        np.array(
            [
                [1.0, 0.0, 2.5, np.nan],  # one fractional, one NaN
                [0.0, -3.0, 0.0, 0.0],  # one negative
                [np.inf, 7.0, 2e8, 0.0],  # one infinite, one huge
                [0.0, 0.0, 0.0, 0.0],
            ]
        )
    )
    st = count_stats(x, huge=2**24)
    assert (st.n_nan, st.n_inf, st.n_negative, st.n_fractional, st.n_huge) == (1, 1, 1, 1, 1)
    assert (st.min_finite, st.max_finite) == (-3.0, 2e8)
    np.testing.assert_array_equal(st.row_abs_totals, [3.5, 3.0, 7.0 + 2e8, 0.0])
    ints = count_stats(sp.csr_matrix(np.array([[0, 4], [5, 0]], dtype=np.int32)), huge=4)
    assert (ints.n_fractional, ints.n_huge, ints.n_negative) == (0, 1, 0)
    np.testing.assert_array_equal(ints.row_abs_totals, [4.0, 5.0])


def test_count_stats_of_chunks_add_up_to_the_whole():
    rng = np.random.default_rng(0)
    x = sp.random(5000, 40, density=0.2, format="csr", random_state=1, data_rvs=lambda k: rng.integers(-2, 30, k))
    whole = count_stats(x, huge=25)
    parts = CountStats.merged([count_stats(b, huge=25) for _, _, b in from_matrix(x, 777).chunks()])
    for name in ("n_nan", "n_inf", "n_negative", "n_fractional", "n_huge", "min_finite", "max_finite"):
        assert getattr(whole, name) == getattr(parts, name), name
    np.testing.assert_array_equal(whole.row_abs_totals, parts.row_abs_totals)
    np.testing.assert_array_equal(whole.row_abs_totals, np.asarray(abs(x).sum(axis=1)).ravel())
    assert whole.n_negative == int((x.data < 0).sum()) and whole.n_huge == int((x.data > 25).sum())


# -- reading by chunks ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def disk_slide(tmp_path_factory):
    """3,000 Visium HD-like bins written straight to disk, with the reference and the slide in memory."""
    folder = tmp_path_factory.mktemp("bins")
    path = folder / "bins.h5ad"
    made = write_binned_slide(path, 3000, n_genes=300, n_types=5, chunk_bins=700, umi_median=150, seed=3)
    ref_path = folder / "ref.h5ad"
    made["reference"].write_h5ad(ref_path)
    return path, ref_path, ad.read_h5ad(path), made


def test_binned_slide_simulator_writes_a_readable_h5ad_with_its_truth(disk_slide):
    path, _, slide, made = disk_slide
    assert slide.shape == (3000, 300) and slide.X.nnz == made["nnz"] and slide.X.dtype == np.int32
    umi = np.asarray(slide.X.sum(axis=1)).ravel()
    assert 10 <= umi.min() and umi.max() <= 1000 and 60 < np.median(umi) < 300
    truth = slide.obsm["true_proportions"]
    np.testing.assert_allclose(truth.sum(axis=1), 1.0, atol=1e-6)
    doublets = slide.obs["true_second_type"].to_numpy() >= 0
    assert 0.3 < doublets.mean() < 0.5
    np.testing.assert_array_equal(np.diff(slide.obsm["spatial"][:2, 0]), [8.0])  # 8 µm bins


def test_chunks_read_from_disk_equal_the_matrix(disk_slide, tmp_path):
    path, _, slide, _ = disk_slide
    src = open_counts(path, chunk_spots=640)
    assert src.shape == slide.shape
    got = sp.vstack([b for _, _, b in src.chunks()], format="csr")
    assert (got != slide.X).nnz == 0
    assert src.most_rows_held == 640
    rows = np.array([0, 5, 639, 640, 2999])
    assert (src.take_rows(rows) != slide.X[rows]).nnz == 0
    assert src.most_rows_held == 640  # take_rows reads a span of one chunk at most
    # a dense X and a .zarr store read the same way
    dense = ad.AnnData(X=slide.X.toarray(), obs=slide.obs[[]], var=slide.var)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    dense.write_zarr(tmp_path / "dense.zarr")
    slide.write_zarr(tmp_path / "csr.zarr")
    for p in (tmp_path / "dense.h5ad", tmp_path / "dense.zarr", tmp_path / "csr.zarr"):
        blocks = sp.vstack([b for _, _, b in open_counts(p, chunk_spots=1000).chunks()], format="csr")
        assert (blocks != slide.X).nnz == 0, p


def test_counts_stored_by_gene_are_refused_with_the_fix(disk_slide, tmp_path):
    _, _, slide, _ = disk_slide
    by_gene = ad.AnnData(X=sp.csc_matrix(slide.X), obs=slide.obs[[]], var=slide.var)
    by_gene.obsm["spatial"] = slide.obsm["spatial"]
    by_gene.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputError) as err:
        open_counts(tmp_path / "csc.h5ad")
    assert err.value.code == "csc_counts" and "tocsr()" in str(err.value)


def test_rctd_doublet_by_chunks_from_disk_equals_the_in_memory_run(disk_slide):
    path, ref_path, slide, _ = disk_slide
    opts = {"mode": "doublet", "umi_min": 20, "batch_size": 256}
    whole = api.run_deconvolution(slide, ref_path, "rctd", params=dict(opts), device="cpu")
    chunked = api.run_deconvolution(path, ref_path, "rctd", params={**opts, "chunk_spots": 450}, device="cpu")
    p, q = whole.result.proportions, chunked.result.proportions
    np.testing.assert_array_equal(np.isnan(p), np.isnan(q))
    assert np.nanmax(np.abs(p - q)) <= 1e-8
    assert whole.result.fitted.sum() > 2500  # nearly every bin is fitted at umi_min 20
    np.testing.assert_array_equal(
        whole.adata.obs["rctd_spot_class"].to_numpy(), chunked.adata.obs["rctd_spot_class"].to_numpy()
    )
    assert whole.result.params["sigma"] == chunked.result.params["sigma"]
    # and the answer is right: the true first type is RCTD's first type on most bins it calls singlets or doublets
    first = chunked.adata.obs["rctd_first_type"].astype(str).to_numpy()
    true_first = np.array([f"type{k:02d}" for k in range(5)])[slide.obs["true_first_type"].to_numpy()]
    true_second = slide.obs["true_second_type"].to_numpy()
    true_second = np.where(true_second >= 0, np.array([f"type{k:02d}" for k in range(5)])[true_second], "")
    fitted = chunked.result.fitted
    hit = (first == true_first) | (first == true_second)
    assert hit[fitted].mean() > 0.9


def test_a_slide_larger_than_the_memory_limit_runs_in_chunks(disk_slide, tmp_path):
    """The counts of a slide on disk are never all in memory: every read is at most a chunk, and the chunked
    run's traced peak is lower than the in-memory run's by nearly the counts' whole size. What the chunked run
    still holds grows with the spots, not the counts: the per-spot results and names (here about as large as the
    counts, since these bins hold ~120 stored values each)."""
    made = write_binned_slide(tmp_path / "big.h5ad", 24_000, n_genes=300, n_types=5, umi_median=300, seed=4)
    made["reference"].write_h5ad(tmp_path / "ref.h5ad")
    whole_x = ad.read_h5ad(tmp_path / "big.h5ad").X
    counts_bytes = whole_x.data.nbytes + whole_x.indices.nbytes + whole_x.indptr.nbytes
    # the likelihood table of the run's sigma, computed (or read) here once, so neither measured run pays for it
    build_tables([0.5], int(whole_x.max()))
    del whole_x
    chunk = 2000
    sizes = []
    real_open = open_lazy_slide

    def watched(*args, **kwargs):
        adata, src = real_open(*args, **kwargs)
        read = src._read_rows

        def read_rows(lo, hi):
            block = read(lo, hi)
            sizes.append(block.data.nbytes + block.indices.nbytes + block.indptr.nbytes)
            return block

        src._read_rows = read_rows
        return adata, src

    import spatial_deconv_gui.io.chunked as chunked_mod

    # umi_min keeps the fitted bins few: every pass still reads every bin, the fits stay quick
    params = {"mode": "full", "umi_min": 900, "sigma_override": 0.5, "chunk_spots": chunk}
    chunked_mod.open_lazy_slide, saved = watched, chunked_mod.open_lazy_slide
    try:
        tracemalloc.start()
        run = api.run_deconvolution(tmp_path / "big.h5ad", tmp_path / "ref.h5ad", "rctd", params=params, device="cpu")
        _, peak_chunked = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        chunked_mod.open_lazy_slide = saved
    assert run.result.fitted.sum() > 50
    assert max(sizes) <= counts_bytes * chunk / 24_000 * 1.5  # one chunk's share of the counts, give or take
    assert len(sizes) >= 3 * (24_000 // chunk)  # validation + RCTD's passes each read every chunk
    in_memory = {k: v for k, v in params.items() if k != "chunk_spots"}
    tracemalloc.start()
    run_mem = api.run_deconvolution(
        tmp_path / "big.h5ad", tmp_path / "ref.h5ad", "rctd", params=in_memory, device="cpu"
    )
    _, peak_whole = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_whole - peak_chunked > 0.8 * counts_bytes
    assert np.nanmax(np.abs(run_mem.result.proportions - run.result.proportions)) <= 1e-8


def test_chunked_reading_names_what_it_takes(tmp_path, disk_slide):
    _, ref_path, _, _ = disk_slide
    folder = tmp_path / "not_a_store.txt"
    folder.write_text("x")
    with pytest.raises(InputError) as err:
        api.run_deconvolution(folder, ref_path, "rctd", params={"chunk_spots": 100}, device="cpu")
    assert err.value.code == "chunks_need_h5ad"


def test_dask_and_in_memory_matrices_read_by_chunks():
    da = pytest.importorskip("dask.array")
    x = sp.random(1000, 30, density=0.3, format="csr", random_state=2)
    lazy = from_matrix(da.from_array(x.toarray(), chunks=(128, 30)), 300)
    assert isinstance(lazy, ChunkedCounts) and lazy.shape == (1000, 30)
    np.testing.assert_allclose(sp.vstack([b for _, _, b in lazy.chunks()]).toarray(), x.toarray())
    assert lazy.most_rows_held == 300 and lazy.rows_read == 1000
    with pytest.raises(ValueError):
        from_matrix(x, 100).take_rows(np.array([5, 2]))
    assert from_group  # the h5py / zarr element reader is exercised through open_counts above


# -- the results-only output contract ------------------------------------------------------------------------
def test_cli_writes_results_without_counts_unless_asked(small_pair_files, tmp_path):
    s, r = small_pair_files
    slide = ad.read_h5ad(s)
    out, full = tmp_path / "res.h5ad", tmp_path / "full.h5ad"
    base = ["run", str(s), str(r), "--method", "flash", "-q"]
    assert main([*base, "-o", str(out)]) == 0
    assert main([*base, "-o", str(full), "--with-counts"]) == 0
    res, whole = ad.read_h5ad(out), ad.read_h5ad(full)
    assert res.X is None and len(res.layers) == 0  # the counts stay in the input
    assert res.shape == slide.shape and list(res.var_names) == list(slide.var_names)
    np.testing.assert_array_equal(res.obsm["spatial"], slide.obsm["spatial"])
    for col in slide.obs.columns:  # the slide's own annotations are kept
        np.testing.assert_array_equal(res.obs[col].to_numpy(), slide.obs[col].to_numpy())
    np.testing.assert_array_equal(res.obsm["flash_proportions"].to_numpy(), whole.obsm["flash_proportions"].to_numpy())
    assert res.uns["flash"]["method"] == "flash" and "flash_dominant_type" in res.obs
    assert (whole.X != slide.X).nnz == 0  # --with-counts: the counts as they were
    # the results-only file opens as a saved result, and reading it for counts says what is missing
    back = api.saved_results(out)
    assert [o.result.method for o in back] == ["flash"]
    with pytest.raises(InputError) as err:
        api.run_deconvolution(out, r, "flash", device="cpu")
    assert err.value.code == "missing_counts"


def test_attach_result_shares_the_counts_and_leaves_the_slide_untouched(small_pair_files):
    s, r = small_pair_files
    slide = ad.read_h5ad(s)
    before_obs = slide.obs.copy()
    run = api.run_deconvolution(slide, r, "flash", device="cpu")
    assert run.adata.X is slide.X  # no copy of the counts
    pd.testing.assert_frame_equal(slide.obs, before_obs)
    assert "flash_proportions" not in slide.obsm and "flash" not in slide.uns


def test_a_flash_run_imports_neither_torch_nor_matplotlib():
    code = (
        "import sys; import spatial_deconv_gui.cli, spatial_deconv_gui.api as a; "
        "from spatial_deconv_gui.engines.registry import get_method; get_method('flash').load(); "
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- results written chunk by chunk, and resumed ---------------------------------------------------------------
def _file_digest(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def counted_fits(monkeypatch):
    """Every chunk RCTD fits in this process, as (first row, rows)."""
    import spatial_deconv_gui.engines.rctd.engine as engine

    fits = []
    real = engine.fit_chunk

    def counting(counts, numi, model):
        fits.append(counts.shape[0])
        return real(counts, numi, model)

    monkeypatch.setattr(engine, "fit_chunk", counting)
    return fits


def _same_rctd_output(a, b):
    """Every per-spot table of two RCTD runs, equal (NaN where the other has NaN)."""
    for key in a.result.obsm:
        x, y = np.asarray(a.result.obsm[key], float), np.asarray(b.result.obsm[key], float)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        assert np.nanmax(np.abs(x - y)) <= 1e-8, key
    for key in a.result.obs:
        np.testing.assert_array_equal(np.asarray(a.result.obs[key]), np.asarray(b.result.obs[key]), err_msg=key)
    np.testing.assert_array_equal(a.result.proportions, b.result.proportions)


def test_rctd_writes_chunks_to_the_partial_store_and_a_stopped_run_resumes_only_the_rest(
    disk_slide, tmp_path, counted_fits
):
    from spatial_deconv_gui.engines.base import Cancelled

    path, ref_path, _, _ = disk_slide
    before = _file_digest(path)
    opts = {"mode": "doublet", "umi_min": 20, "batch_size": 256, "chunk_spots": 700}
    whole = api.run_deconvolution(path, ref_path, "rctd", params=dict(opts), device="cpu", uncertainty=True)
    n_fit = int(whole.result.fitted.sum())
    n_chunks = -(-n_fit // 256)
    assert len(counted_fits) == n_chunks and n_chunks >= 10
    store = tmp_path / "out.h5ad.partial"

    # stopped after 4 chunks: their results are on disk, nothing else was fitted
    stop, seen = __import__("threading").Event(), []

    def stop_after_four(event):
        if event.stage == "pixels" and event.partial is not None:
            seen.append(event)
            if len(seen) == 4:
                stop.set()

    counted_fits.clear()
    with pytest.raises(Cancelled):
        api.run_deconvolution(
            path, ref_path, "rctd", params=dict(opts), device="cpu", uncertainty=True,
            partial_store=store, progress=stop_after_four, cancel_event=stop,
        )  # fmt: skip
    assert len(counted_fits) == 4
    chunk_files = sorted(store.glob("chunk-*.npz"))
    assert [f.name for f in chunk_files] == [f"chunk-{lo:09d}-{lo + 256:09d}.npz" for lo in (0, 256, 512, 768)]
    stamps = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in chunk_files}
    part = dict(np.load(chunk_files[1]))
    for field in ("weights", "props", "spot_class", "first", "second", "wd", "lower", "upper"):
        assert part[field].shape[0] == 256, field

    # started again alike: the 4 chunks are read back, only the others fitted, the answer the in-memory one's
    counted_fits.clear()
    resumed = api.run_deconvolution(
        path, ref_path, "rctd", params=dict(opts), device="cpu", uncertainty=True, partial_store=store
    )
    assert len(counted_fits) == n_chunks - 4 and sum(counted_fits) == n_fit - 4 * 256
    assert resumed.result.params["n_chunks_resumed"] == 4 and resumed.result.params["n_chunks"] == n_chunks
    assert any(f"resumed 4 of {n_chunks} chunks" in n for n in resumed.notices)
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in chunk_files} == stamps  # not rewritten
    assert len(list(store.glob("chunk-*.npz"))) == n_chunks
    _same_rctd_output(whole, resumed)
    assert "rctd_proportions_q05" in resumed.result.obsm  # the intervals went through the store too

    # other settings: the store is emptied with a notice, never mixed in; every chunk is fitted again
    counted_fits.clear()
    other = api.run_deconvolution(
        path, ref_path, "rctd", params={**opts, "doublet_threshold": 30.0}, device="cpu", partial_store=store
    )
    assert len(counted_fits) == n_chunks and other.result.params["n_chunks_resumed"] == 0
    assert any("other settings or another input" in n and "config.doublet_threshold" in n for n in other.notices)
    other.partial_store.remove()
    assert not store.exists()
    assert _file_digest(path) == before  # the input is never written


def test_a_store_left_by_another_input_is_not_resumed(disk_slide, tmp_path, counted_fits):
    import shutil

    path, ref_path, _, _ = disk_slide
    copy = tmp_path / "copy.h5ad"
    shutil.copyfile(path, copy)
    opts = {"mode": "full", "umi_min": 20, "batch_size": 1000, "sigma_override": 0.5}
    store = tmp_path / "res.partial"
    first = api.run_deconvolution(path, ref_path, "rctd", params=dict(opts), device="cpu", partial_store=store)
    assert len(list(store.glob("chunk-*.npz"))) == 3
    counted_fits.clear()
    again = api.run_deconvolution(copy, ref_path, "rctd", params=dict(opts), device="cpu", partial_store=store)
    assert len(counted_fits) == 3 and again.result.params["n_chunks_resumed"] == 0
    assert any("(differing: spatial)" in n for n in again.notices)
    np.testing.assert_array_equal(first.result.proportions, again.result.proportions)
    with pytest.raises(InputError) as err:
        api.run_deconvolution(path, ref_path, "flash", device="cpu", partial_store=store)
    assert err.value.code == "partial_store_unsupported"
    # a run that fails before any chunk leaves no store behind
    with pytest.raises(ValueError, match="no spot passes"):
        api.run_deconvolution(
            path, ref_path, "rctd", params={**opts, "umi_min": 10**6}, device="cpu", partial_store=tmp_path / "none"
        )
    assert not (tmp_path / "none").exists()


def test_cli_rctd_output_assembled_from_the_store_which_is_then_removed(disk_slide, tmp_path):
    path, ref_path, _, _ = disk_slide
    before = _file_digest(path)
    out = tmp_path / "res.h5ad"
    args = ["run", str(path), str(ref_path), "--method", "rctd", "--mode", "full", "--umi-min", "20"]
    args += ["--sigma-override", "0.5", "--batch-size", "1000", "--chunk-spots", "700", "-q", "-o", str(out)]
    assert main(args) == 0
    assert out.exists() and not (tmp_path / "res.h5ad.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.h5ad"]  # no temporaries left either
    mem = api.run_deconvolution(
        ad.read_h5ad(path), ref_path, "rctd", device="cpu",
        params={"mode": "full", "umi_min": 20, "sigma_override": 0.5, "batch_size": 1000},
    )  # fmt: skip
    got = ad.read_h5ad(out).obsm["rctd_proportions"].to_numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(mem.result.proportions))
    assert np.nanmax(np.abs(got - mem.result.proportions)) <= 1e-8
    assert _file_digest(path) == before


def test_the_partial_store_deletes_only_what_it_wrote(tmp_path):
    from spatial_deconv_gui.io.partial import PartialStore

    folder = tmp_path / "out.h5ad.partial"
    folder.mkdir()
    (folder / ".keep").write_text("a user's file")
    (folder / "notes.txt").write_text("another")
    store = PartialStore.open(folder, {"method": "rctd"})
    store.begin({"spots": 4}, chunk_size=2)
    store.write_chunk(0, 2, {"w": np.array([[0.25, 0.75], [1.0, 0.0]])})
    (folder / ".chunk-000000002-000000004.npz.123-abcdef01.tmp").write_bytes(b"half")  # a killed writer's
    assert store.finished() == [(0, 2)]
    out = {"w": np.zeros((2, 2))}
    assert store.assemble(out) == [(0, 2)] and out["w"][0, 1] == 0.75
    store.remove()
    assert sorted(p.name for p in folder.iterdir()) == [".keep", "notes.txt"]
