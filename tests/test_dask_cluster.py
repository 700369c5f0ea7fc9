"""The engines on Dask (engines.cluster): RCTD's spots, training's targets and screens' knockouts give the
in-process answer on a LocalCluster whatever its number of workers, a worker killed mid-run costs only its
chunks, a chunk that keeps killing its workers is named with the rest kept, and bad schedulers or workers fail
quickly with the version on each side."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("distributed")

from spatial_deconv_gui import api  # noqa: E402
from spatial_deconv_gui import perturb_api as papi  # noqa: E402
from spatial_deconv_gui.engines import cluster as dc  # noqa: E402
from spatial_deconv_gui.engines.base import Cancelled, RunControl, thread_cap  # noqa: E402
from spatial_deconv_gui.engines.perturb import model_dir as md  # noqa: E402
from spatial_deconv_gui.engines.perturb import priors  # noqa: E402
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue  # noqa: E402
from spatial_deconv_gui.engines.perturb.train import TrainConfig, train  # noqa: E402
from spatial_deconv_gui.engines.rctd.config import RCTDConfig  # noqa: E402
from spatial_deconv_gui.engines.rctd.engine import run_rctd  # noqa: E402
from spatial_deconv_gui.io import reference_input, spatial_input  # noqa: E402
from spatial_deconv_gui.io.errors import InputError  # noqa: E402
from spatial_deconv_gui.io.partial import PartialStore  # noqa: E402
from spatial_deconv_gui.simulate import simulate_dataset  # noqa: E402


@pytest.fixture(scope="module")
def rctd_data(tmp_path_factory):
    slide, reference = simulate_dataset(n_spots=160, n_genes=200, n_types=4, cells_per_type=40, seed=3)
    cache = str(tmp_path_factory.mktemp("tables"))
    cfg = RCTDConfig(mode="doublet", batch_size=25, cache_dir=cache, sigma_override=0.8)
    return spatial_input(slide), reference_input(reference), cfg


@pytest.fixture(scope="module")
def rctd_expected(rctd_data):
    spatial, reference, cfg = rctd_data
    return run_rctd(spatial, reference, cfg)


def _same_result(a, b, tol=1e-8):
    np.testing.assert_allclose(a.proportions, b.proportions, atol=tol, rtol=0)
    assert a.obs.keys() == b.obs.keys() and a.obsm.keys() == b.obsm.keys()
    for key in a.obs:
        x, y = np.asarray(a.obs[key]), np.asarray(b.obs[key])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, atol=tol, rtol=0)
        else:
            assert (x == y).all(), key
    for key in a.obsm:
        np.testing.assert_allclose(np.asarray(a.obsm[key], float), np.asarray(b.obsm[key], float), atol=tol, rtol=0)


def _events():
    seen = []
    return seen, RunControl(lambda e: seen.append(e) if e.partial is not None else None)


@pytest.mark.parametrize("n_workers", [1, 3])
def test_rctd_on_a_cluster_equals_in_process(rctd_data, rctd_expected, n_workers):
    spatial, reference, cfg = rctd_data
    seen, control = _events()
    with dc.connect("local", n_workers=n_workers, processes=False) as cluster:
        assert cluster.n_workers == n_workers
        got = run_rctd(spatial, reference, cfg, control, cluster=cluster)
    _same_result(got, rctd_expected)
    # progress streamed chunk by chunk: every fitted spot reported exactly once, with its final proportions
    spots = np.concatenate([e.partial.spot_index for e in seen])
    assert len(seen) == int(np.ceil(got.fitted.sum() / 25)) and np.array_equal(
        np.sort(spots), np.flatnonzero(got.fitted)
    )
    for e in seen:
        np.testing.assert_allclose(e.partial.proportions, rctd_expected.proportions[e.partial.spot_index], atol=1e-8)


def test_api_scheduler_runs_rctd_and_refuses_other_methods(rctd_data, rctd_expected):
    slide, reference = simulate_dataset(n_spots=160, n_genes=200, n_types=4, cells_per_type=40, seed=3)
    _, _, cfg = rctd_data
    params = {"mode": "doublet", "batch_size": 25, "cache_dir": cfg.cache_dir, "sigma_override": 0.8}
    with dc.connect("local", n_workers=2, processes=False) as cluster:
        run = api.run_deconvolution(slide, reference, "rctd", params=params, device="cpu", scheduler=cluster)
    np.testing.assert_allclose(run.result.proportions, rctd_expected.proportions, atol=1e-8, rtol=0)
    with pytest.raises(InputError, match="runs in one process") as err:
        api.run_deconvolution(slide, reference, "c2l", scheduler="local")
    assert err.value.code == "scheduler_unsupported"


class _DroppingCluster(dc.Cluster):
    """Runs the pieces here, but loses piece ``lost`` the way the real cluster reports a chunk that killed
    its workers each time (KilledWorker -> PiecesFailed after the others)."""

    def __init__(self, lost: int):
        super().__init__(client=None, scheduler="test")
        self.lost = lost

    @property
    def n_workers(self) -> int:
        return 1

    def share(self, value):
        return value

    def run(self, fn, pieces, *, shared=None, on_result, control=None, name="piece", poll_s=0.05, in_flight=None):
        for i, piece in enumerate(pieces):
            if i != self.lost:
                on_result(i, fn(*piece, shared))
        raise dc.PiecesFailed({self.lost: "its worker died each time it ran"})


def test_a_chunk_lost_on_the_cluster_names_its_spots_and_keeps_the_rest(rctd_data, rctd_expected):
    spatial, reference, cfg = rctd_data
    with pytest.raises(dc.PiecesFailed) as err:
        run_rctd(spatial, reference, cfg, cluster=_DroppingCluster(lost=1))
    fitted = np.flatnonzero(rctd_expected.fitted)
    lost = fitted[25:50]  # the second chunk of the fitted spots
    assert err.value.what == [str(b) for b in np.asarray(spatial.barcodes)[lost]]
    assert "25 spots have no result" in str(err.value) and str(spatial.barcodes[lost[0]]) in str(err.value)
    partial = err.value.partial
    assert np.isnan(partial.proportions[lost]).all()
    kept = np.setdiff1d(fitted, lost)
    np.testing.assert_allclose(partial.proportions[kept], rctd_expected.proportions[kept], atol=1e-8, rtol=0)
    assert partial.params["n_spots_fitted"] == kept.size
    assert (np.asarray(partial.obs["rctd_spot_class"])[lost] == "filtered").all()


@pytest.fixture(scope="module")
def grn_tissue():
    sim = simulate_grn_tissue(seed=0)
    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    lr, _ = priors.load_lr(s["lr_prior"])
    cfg = TrainConfig(
        radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"], problems_per_batch=4
    )
    return sim, grn, lr, cfg


def _train(sim, grn, lr, cfg, out, **kw):
    return train(
        sim.X,
        sim.var_names,
        sim.obsm["spatial"],
        sim.obs["cluster"].astype(str).to_numpy(),
        grn,
        lr,
        out,
        config=cfg,
        **kw,
    )


def test_training_on_a_cluster_writes_the_in_process_shards(grn_tissue, tmp_path):
    sim, grn, lr, cfg = grn_tissue
    here = _train(sim, grn, lr, cfg, tmp_path / "here")
    progress = []
    with dc.connect("local", n_workers=2, processes=False) as cluster:
        there = _train(
            sim, grn, lr, cfg, tmp_path / "there", cluster=cluster, control=RunControl(progress.append, max_rate=0)
        )
    shards = here[md.STORE_CHECKSUMS]
    assert len(shards) >= 3  # several batches of targets, so several tasks
    # the same shards, byte for byte; numbered in the order they arrived (the cluster's completion order)
    assert sorted(there[md.STORE_CHECKSUMS].values()) == sorted(shards.values())
    assert there["status"] == "complete" and there["targets"] == here["targets"]
    by_sha = {sha: key for key, sha in there[md.STORE_CHECKSUMS].items()}
    for key, sha in shards.items():
        assert (tmp_path / "here" / key).read_bytes() == (tmp_path / "there" / by_sha[sha]).read_bytes()
    trained = [e for e in progress if e.stage == "training"]
    assert trained[-1].fraction == 1.0 and len({e.message.split(" ")[0] for e in trained[:-1]}) == len(here["targets"])


def test_per_cell_training_on_a_cluster_gives_the_in_process_coefficients(grn_tissue, tmp_path):
    # full mode: each task fits its batch's seeds and then its per-cell network on the worker
    sim, grn, lr, cfg = grn_tissue
    cfg = dataclasses.replace(cfg, mode="hybrid", epochs=20, problems_per_batch=8)
    # torch's thread count is process-wide and the workers are threads of this process: one torch thread on both
    # sides. Each batch's network is initialised from its own generator: through torch's global one, two tasks
    # running at once interleaved their draws (2 of 88 held-out R² moved by 5e-5 in a clean-clone CI run)
    with thread_cap(1):
        here = _train(sim, grn, lr, cfg, tmp_path / "here")
        with dc.connect("local", n_workers=2, processes=False) as cluster:
            there = _train(sim, grn, lr, cfg, tmp_path / "there", cluster=cluster)
    assert there["status"] == "complete" and there["percell"]["kept"] == here["percell"]["kept"]
    a = md.read_store(tmp_path / "here", here, md.TABLE_COLUMNS)
    b = md.read_store(tmp_path / "there", there, md.TABLE_COLUMNS)
    order_a, order_b = np.argsort(a.targets), np.argsort(b.targets)
    assert (np.asarray(a.targets)[order_a] == np.asarray(b.targets)[order_b]).all()
    np.testing.assert_allclose(np.asarray(b.pc_r2)[order_b], np.asarray(a.pc_r2)[order_a], atol=1e-6, rtol=0)
    assert (np.asarray(b.pc_flag)[order_b] == np.asarray(a.pc_flag)[order_a]).all()


def test_a_lost_batch_of_targets_is_named_and_training_again_fits_only_it(grn_tissue, tmp_path):
    sim, grn, lr, cfg = grn_tissue
    here = _train(sim, grn, lr, cfg, tmp_path / "here")
    with pytest.raises(dc.PiecesFailed) as err:
        _train(sim, grn, lr, cfg, tmp_path / "there", cluster=_DroppingCluster(lost=2))
    per_batch = cfg.problems_per_batch // len(here["clusters"])
    lost = here["targets"][2 * per_batch : 3 * per_batch]
    assert err.value.what == lost and all(t in str(err.value) for t in lost)
    kept = md.read_manifest(tmp_path / "there")
    assert kept["status"] == "training" and len(kept[md.STORE_CHECKSUMS]) == len(here[md.STORE_CHECKSUMS]) - 1
    assert md.finished_genes(tmp_path / "there", here["targets"]) == set(here["targets"]) - set(lost)
    progress = []
    again = _train(sim, grn, lr, cfg, tmp_path / "there", control=RunControl(progress.append, max_rate=0))
    assert again["status"] == "complete"
    assert sorted(again[md.STORE_CHECKSUMS].values()) == sorted(here[md.STORE_CHECKSUMS].values())
    refitted = {e.message.split(" ")[0] for e in progress if e.stage == "training" and "targets" in e.message}
    assert refitted == set(lost)


@pytest.fixture(scope="module")
def model_dir(grn_tissue, tmp_path_factory):
    sim, grn, lr, cfg = grn_tissue
    out = tmp_path_factory.mktemp("screen") / "m"
    _train(sim, grn, lr, cfg, out)
    return out


def test_screens_on_a_cluster_equal_in_process_for_genes_and_values(model_dir, tmp_path):
    model = papi.load_model(model_dir)
    genes = ["Tf0", "Tf1", "Tf2", model.targets[-1]]
    cells = np.arange(0, model.expr.shape[0], 2)
    here = papi.knockout_screen(model, genes, 0.0, cells=cells, steps=2)
    doses = papi.knockout_screen(model, "Tf0", [0.0, 0.5, 2.0], cells=cells, steps=2)
    with dc.connect("local", n_workers=2, processes=False) as cluster:
        there = papi.knockout_screen(model, genes, 0.0, cells=cells, steps=2, scheduler=cluster)
        doses_there = papi.knockout_screen(model, "Tf0", [0.0, 0.5, 2.0], cells=cells, steps=2, scheduler=cluster)
    numbers = ["total_abs_delta", "mean_abs_delta_per_cell", "max_abs_delta", "n_genes_moved"]
    for a, b in ((here, there), (doses, doses_there)):
        assert list(a.gene) == list(b.gene) and list(a.value) == list(b.value) and list(a["rank"]) == list(b["rank"])
        np.testing.assert_allclose(a[numbers].to_numpy(float), b[numbers].to_numpy(float), atol=1e-8, rtol=0)
        assert list(a.top_genes) == list(b.top_genes)
    assert sorted(doses.value) == [0.0, 0.5, 2.0] and set(doses.gene) == {"Tf0"}
    # the knockout (0) and a dose above the cells' levels move the network; ranks follow total |Δ|
    assert np.all(np.diff(doses.total_abs_delta) <= 0) and doses.total_abs_delta.min() > 0
    with pytest.raises(InputError, match="listed twice"):
        papi.knockout_screen(model, ["Tf0", "Tf0"], 0.0)
    with pytest.raises(dc.PiecesFailed) as err:  # a knockout lost on the cluster: named, the others' table kept
        papi.knockout_screen(model, genes, 0.0, cells=cells, steps=2, scheduler=_DroppingCluster(lost=1))
    assert err.value.what == ["Tf1=0"] and "Tf1=0" in str(err.value)
    rest = err.value.partial
    assert sorted(rest.gene) == sorted(set(genes) - {"Tf1"}) and list(rest["rank"]) == [1, 2, 3]
    expected = here.set_index("gene").drop("Tf1")
    np.testing.assert_allclose(rest.set_index("gene").loc[expected.index, "total_abs_delta"], expected.total_abs_delta)


def test_perturb_screen_command_writes_the_ranked_table(model_dir, tmp_path):
    from spatial_deconv_gui.perturb_cli import main as perturb_main

    out = tmp_path / "doses.tsv"
    rc = perturb_main(
        ["perturb", "screen", str(model_dir), "--gene", "Tf1", "--value", "0", "--value", "3", "--steps", "2"]
        + ["-o", str(out), "-q"]
    )
    table = pd.read_csv(out, sep="\t")
    expected = papi.knockout_screen(papi.load_model(model_dir), "Tf1", [0.0, 3.0], steps=2)
    assert rc == 0 and list(table.value) == list(expected.value)
    np.testing.assert_allclose(table.total_abs_delta, expected.total_abs_delta, rtol=1e-15)
    rc = perturb_main(
        ["perturb", "screen", str(model_dir), "--gene", "Tf1", "-o", str(out), "--scheduler", "tcp://127.0.0.1:1"]
        + ["-q"]
    )
    assert rc == 2


def _fits_counted(monkeypatch):
    import spatial_deconv_gui.engines.rctd.engine as engine

    fits, real = [], engine.fit_chunk

    def counting(counts, numi, model):
        fits.append(counts.shape[0])
        return real(counts, numi, model)

    monkeypatch.setattr(engine, "fit_chunk", counting)
    return fits


def _stamps(folder):
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in folder.glob("chunk-*.npz")}


def test_a_lost_chunk_stays_out_of_the_partial_store_and_the_rerun_fits_only_it(
    rctd_data, rctd_expected, tmp_path, monkeypatch
):
    spatial, reference, cfg = rctd_data
    run_id = {"test": "lost chunk"}
    store = PartialStore.open(tmp_path / "out.partial", run_id)
    with pytest.raises(dc.PiecesFailed):
        run_rctd(spatial, reference, cfg, cluster=_DroppingCluster(lost=1), partial_store=store)
    n_chunks = int(np.ceil(rctd_expected.fitted.sum() / 25))
    kept = _stamps(tmp_path / "out.partial")
    assert len(kept) == n_chunks - 1 and "chunk-000000025-000000050.npz" not in kept
    fits = _fits_counted(monkeypatch)
    again = run_rctd(spatial, reference, cfg, partial_store=PartialStore.open(tmp_path / "out.partial", run_id))
    assert fits == [25]  # only the lost chunk is fitted again
    assert again.params["n_chunks_resumed"] == n_chunks - 1
    _same_result(again, rctd_expected)
    assert {n: s for n, s in _stamps(tmp_path / "out.partial").items() if n in kept} == kept


def test_a_run_stopped_in_process_resumes_on_a_cluster(rctd_data, rctd_expected, tmp_path):
    spatial, reference, cfg = rctd_data
    run_id = {"test": "resume on a cluster"}
    seen = []

    def stop_after_two(event):
        if event.partial is not None:
            seen.append(event)
            if len(seen) == 2:
                control.cancel()

    control = RunControl(stop_after_two)
    with pytest.raises(Cancelled):
        run_rctd(spatial, reference, cfg, control, partial_store=PartialStore.open(tmp_path / "p", run_id))
    first = _stamps(tmp_path / "p")
    assert sorted(first) == ["chunk-000000000-000000025.npz", "chunk-000000025-000000050.npz"]
    seen.clear()
    store = PartialStore.open(tmp_path / "p", run_id)
    with dc.connect("local", n_workers=2, processes=False) as cluster:
        got = run_rctd(spatial, reference, cfg, RunControl(seen.append), cluster=cluster, partial_store=store)
    _same_result(got, rctd_expected)
    n_chunks = int(np.ceil(rctd_expected.fitted.sum() / 25))
    assert got.params["n_chunks_resumed"] == 2 and len(_stamps(tmp_path / "p")) == n_chunks
    assert {n: _stamps(tmp_path / "p")[n] for n in first} == first  # read back, not rewritten
    fitted_events = [e for e in seen if e.partial is not None]
    assert len(fitted_events) == n_chunks - 2 and "2 of" in fitted_events[-1].message
    store.remove()
    assert not (tmp_path / "p").exists()


def test_the_cluster_draws_pieces_as_tasks_finish():
    drawn, arrived = [], []
    most_in_flight = []

    def pieces():
        for i in range(12):
            drawn.append(i)
            most_in_flight.append(len(drawn) - len(arrived))
            yield (i,)

    with dc.connect("local", n_workers=2, processes=False) as cluster:
        cluster.run(lambda i: i * i, pieces(), on_result=lambda i, r: arrived.append((i, r)), in_flight=3)
    assert sorted(arrived) == [(i, i * i) for i in range(12)]
    assert max(most_in_flight) <= 3  # never more than 3 pieces drawn and not yet handed back


def test_cancel_reaches_the_cluster():
    ran = []

    def slow(i):
        ran.append(i)
        time.sleep(0.3)
        return i

    control = RunControl()
    got = []

    def keep(i, r):
        got.append(r)
        control.cancel()

    with dc.connect("local", n_workers=2, processes=False) as cluster:
        with pytest.raises(Cancelled):
            cluster.run(slow, [(i,) for i in range(20)], on_result=keep, control=control)
        time.sleep(0.8)
        left = cluster.client.processing()
        assert all(not tasks for tasks in left.values())
    assert len(got) == 1 and len(ran) < 8  # the queued tasks never ran


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_fails_within_seconds():
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="no Dask scheduler answered") as err:
        with dc.connect(f"tcp://127.0.0.1:{_free_port()}", timeout=2):
            pass
    assert err.value.code == "scheduler_unreachable" and time.perf_counter() - t0 < 10
    with pytest.raises(InputError, match="neither 'local' nor an address"):
        with dc.connect("nowhere"):
            pass


# ---- real worker processes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_killed_mid_run_costs_only_its_chunks(rctd_data, rctd_expected):
    spatial, reference, cfg = rctd_data
    cfg = RCTDConfig(**{**cfg.to_dict(), "batch_size": 8})
    seen = []
    killed = []
    with dc.connect("local", n_workers=2) as cluster:
        pids = cluster.client.run(os.getpid)

        def on_event(e):
            if e.partial is None:
                return
            seen.append(e.partial.spot_index)
            if not killed:  # both workers are busy with chunks: kill one of them in the middle of its chunk
                processing = {w for w, tasks in cluster.client.processing().items() if tasks}
                victim = sorted(processing or pids)[0]
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(victim)

        got = run_rctd(spatial, reference, cfg, RunControl(on_event), cluster=cluster)
    assert killed
    _same_result(got, rctd_expected)
    spots = np.concatenate(seen)
    assert spots.size == np.unique(spots).size == got.fitted.sum()  # none lost, none twice


def _dies_on(bad: int):
    def piece(i):
        if i == bad:
            os._exit(1)  # the worker process dies, as on a segfault or the OOM killer
        return i * i

    return piece


@pytest.mark.slow
def test_a_chunk_killing_its_workers_is_named_and_the_rest_kept():
    import dask

    got = {}
    # one task per worker thread at a time: a worker's death then suspects only the piece it was running (with
    # prefetched tasks queued on it, Dask counts the death against those too)
    config = {"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(config):
        with dc.connect("local", n_workers=2) as cluster:
            with pytest.raises(dc.PiecesFailed) as err:
                cluster.run(_dies_on(3), [(i,) for i in range(6)], on_result=got.__setitem__)
    assert got == {i: i * i for i in range(6) if i != 3}
    assert list(err.value.failed) == [3] and "worker died each time" in str(err.value)


@pytest.mark.slow
def test_workers_of_another_version_are_refused_with_both_versions(tmp_path):
    from distributed import LocalCluster

    from spatial_deconv_gui import __version__

    fake = tmp_path / "other" / "spatial_deconv_gui"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0.9"\n')
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=None) as sched:
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", sched.scheduler_address, "--nthreads", "1"]
            + ["--no-nanny", "--no-dashboard"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with pytest.raises(InputError, match="do not run spatial_deconv_gui") as err:
                with dc.connect(sched.scheduler_address, timeout=60):
                    pass
        finally:
            worker.kill()
            worker.wait()
    assert err.value.code == "worker_version"
    assert "0.0.9" in str(err.value) and __version__ in str(err.value)


def test_a_scheduler_without_workers_is_a_clear_error():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=None) as sched:
        with pytest.raises(InputError, match="has no workers") as err:
            with dc.connect(sched.scheduler_address, timeout=1):
                pass
    assert err.value.code == "scheduler_no_workers"


def test_the_probe_needs_nothing_of_the_package():
    import pickle

    import cloudpickle

    blob = cloudpickle.dumps(dc._worker_probe())
    assert b"spatial_deconv_gui.engines" not in blob  # sent by value: unpickles where the package is missing
    assert pickle.loads(blob)()["package"] == __import__("spatial_deconv_gui").__version__
