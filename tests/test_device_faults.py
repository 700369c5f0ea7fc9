"""Devices and cached files (issue #20, items 3 and 4): `--device cuda` without CUDA is one clear error and `auto`
falls back with a notice; a CUDA out-of-memory error makes RCTD retry with smaller batches, then stop with the
sizes it tried; RCTD's cached likelihood tables are read without pickles and checked before use.

The out-of-memory errors are simulated (torch's own ``torch.cuda.OutOfMemoryError`` raised where the batch is
fitted), so these tests run on any machine.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from spatial_deconv_gui import api
from spatial_deconv_gui.cli import main
from spatial_deconv_gui.engines import devices, registry
from spatial_deconv_gui.engines.rctd import chunks as rctd_chunks
from spatial_deconv_gui.engines.rctd import engine as rctd_engine
from spatial_deconv_gui.engines.rctd import likelihood
from spatial_deconv_gui.engines.rctd.config import RCTDConfig
from spatial_deconv_gui.io import InputError, reference_input, spatial_input

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@needs_no_cuda
def test_cuda_without_a_gpu_is_refused_before_reading_the_files(tmp_path, capsys):
    # the files do not even exist: the device is checked first
    code = main(["run", str(tmp_path / "s.h5ad"), str(tmp_path / "r.h5ad"), "--method", "flash", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2
    assert "CUDA was requested but torch sees no GPU. Fix: use --device cpu (or auto)." in err
    assert "Traceback" not in err


@needs_no_cuda
def test_auto_falls_back_to_the_cpu_with_a_notice(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    out = tmp_path / "out.h5ad"
    assert main(["run", str(s), str(r), "--method", "flash", "--output", str(out), "--n-threads", "1"]) == 0
    err = capsys.readouterr().err
    why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no GPU"
    assert f"notice: --device auto: {why}; running on the CPU." in err
    assert devices.resolve("cpu") == ("cpu", None)  # asking for the CPU is no fallback


@pytest.fixture(scope="module")
def rctd_inputs(small_pair, tmp_path_factory):
    slide, reference = small_pair
    cache = str(tmp_path_factory.mktemp("tables"))
    return spatial_input(slide), reference_input(reference), cache


def _oom_above(limit: int, calls: list[int]):
    real = rctd_chunks.fit_full

    def fit_full(P, y, *args, **kwargs):
        calls.append(int(y.shape[0]))
        if y.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(P, y, *args, **kwargs)

    return fit_full


def test_rctd_retries_smaller_batches_after_out_of_memory(rctd_inputs, monkeypatch, one_thread):
    spatial, reference, cache = rctd_inputs
    cfg = RCTDConfig(mode="full", batch_size=64, sigma_override=0.84, cache_dir=cache)
    expected = rctd_engine.run_rctd(spatial, reference, cfg)
    calls: list[int] = []
    monkeypatch.setattr(rctd_chunks, "fit_full", _oom_above(20, calls))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rctd_engine.run_rctd(spatial, reference, cfg)
    retries = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    assert retries == [
        "RCTD: CUDA out of memory, retrying with batch size 32",
        "RCTD: CUDA out of memory, retrying with batch size 16",
    ]
    assert calls[:3] == [64, 32, 16] and max(calls[3:]) == 16
    # the smaller batches give the same answer, spot for spot
    np.testing.assert_allclose(result.proportions, expected.proportions, rtol=0, atol=1e-12)
    assert result.params["batch_size"] == 16


def test_rctd_stops_with_the_sizes_it_tried_when_even_one_spot_is_too_many(rctd_inputs, monkeypatch, one_thread):
    spatial, reference, cache = rctd_inputs
    cfg = RCTDConfig(mode="full", batch_size=16, sigma_override=0.84, cache_dir=cache)
    monkeypatch.setattr(rctd_chunks, "fit_full", _oom_above(0, []))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(devices.DeviceOutOfMemory) as err:
            rctd_engine.run_rctd(spatial, reference, cfg)
    assert err.value.tried == [16, 8, 4, 2, 1]
    assert str(err.value).startswith("RCTD ran out of GPU memory on cpu with batches of 16, 8, 4, 2, 1 spots.")
    assert "--device cpu" in str(err.value) and err.value.code == "cuda_out_of_memory"
    # it survives the trip back from a child process (the GUI trains in one)
    back = pickle.loads(pickle.dumps(err.value))
    assert type(back) is devices.DeviceOutOfMemory and back.tried == [16, 8, 4, 2, 1]


def test_out_of_memory_in_any_engine_is_a_clear_error_in_the_cli(small_pair_files, tmp_path, capsys, monkeypatch):
    def runner(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

    info = registry.get_method("c2l")
    monkeypatch.setattr(importlib.import_module(info.module), info.runner, runner)
    s, r = small_pair_files
    out = tmp_path / "out.h5ad"
    code = main(["run", str(s), str(r), "--method", "c2l", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"error: {info.name} ran out of GPU memory on cpu. Fix: run on the CPU (--device cpu)" in err
    assert "Traceback" not in err


# ---- RCTD's cached likelihood tables -------------------------------------------------------------------


@pytest.fixture
def cached_table(tmp_path):
    tables = likelihood.build_tables([0.84], 30, cache=True, cache_dir=tmp_path)
    path = likelihood._cache_path(tmp_path, 0.84)
    assert path.exists()
    return tmp_path, path, tables[0].logq.copy()


def _reload(cache_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tables = likelihood.build_tables([0.84], 30, cache=True, cache_dir=cache_dir)
    return tables[0].logq, [str(w.message) for w in caught]


def test_a_whole_cached_table_is_used_silently(cached_table):
    cache_dir, path, logq = cached_table
    again, messages = _reload(cache_dir)
    np.testing.assert_array_equal(again, logq)
    assert messages == []


def _altered(path: Path):
    with np.load(path, allow_pickle=False) as z:
        parts = {k: z[k] for k in z.files}
    parts["table"] = parts["table"].copy()
    parts["table"][5, 7] += 1e-3  # one value changed, the checksum left as it was
    with open(path, "wb") as fh:
        np.savez(fh, **parts)


def _truncated(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _pickled(path: Path):
    # a file whose table is an object array: loading it would unpickle (and run) what it holds
    marker = path.with_name("unpickled.marker")

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(path, "wb") as fh:
        np.savez(fh, table=np.array([Payload()], dtype=object), sha256=np.str_("x"), sigma=0.84, version="plnq-v1")
    return marker


@pytest.mark.parametrize("damage", [_altered, _truncated, _pickled])
def test_a_damaged_cached_table_is_named_and_computed_again(cached_table, damage):
    cache_dir, path, logq = cached_table
    marker = damage(path)
    again, messages = _reload(cache_dir)
    np.testing.assert_array_equal(again, logq)
    assert len(messages) == 1
    assert messages[0].startswith(f"RCTD: the cached likelihood table {path} is damaged")
    assert messages[0].endswith("computing it again.")
    if marker is not None:
        assert not marker.exists()  # nothing was unpickled
    # the damaged file was replaced by a whole one
    _, messages = _reload(cache_dir)
    assert messages == []
    assert os.path.getsize(path) > 1000


# ---- DestVI's model state, read back from a result file -------------------------------------------------


@pytest.fixture(scope="module")
def destvi_result_file(small_pair, tmp_path_factory):
    slide, reference = small_pair
    run = api.run_deconvolution(slide, reference, "destvi", params={"sc_epochs": 2, "max_epochs": 3, "n_threads": 1})
    path = tmp_path_factory.mktemp("destvi") / "result.h5ad"
    api.save_result(run.adata, path)
    return path, run


def _tampered(state: dict, how: str) -> dict:
    state = dict(state)
    if how == "missing":
        del state["beta"]
    elif how == "missing_layer":
        del state["decoder_linears_1_weight"]
    elif how == "cut_spots":
        state["gamma_modes"] = np.asarray(state["gamma_modes"])[:-3]
    elif how == "text":
        state["per_ct_bias"] = np.asarray(["x"] * 4, dtype=object)
    return state


def test_destvi_state_read_back_imputes_as_before(destvi_result_file):
    path, run = destvi_result_file
    back = ad.read_h5ad(path)
    cell_type = run.result.cell_types[0]
    np.testing.assert_allclose(
        api.destvi_imputed_expression(back, cell_type).to_numpy(),
        api.destvi_imputed_expression(run.result, cell_type).to_numpy(),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "how, named",
    [
        ("missing", "beta is missing"),
        ("missing_layer", "decoder_linears_1_weight is missing"),
        ("cut_spots", "gamma_modes has shape (297,"),
        ("text", "per_ct_bias holds object values, not numbers"),
    ],
)
def test_a_damaged_destvi_state_is_one_error_naming_the_entry(destvi_result_file, how, named):
    path, run = destvi_result_file
    back = ad.read_h5ad(path)
    back.uns["destvi_model"] = _tampered(back.uns["destvi_model"], how)
    with pytest.raises(InputError) as err:
        api.destvi_imputed_expression(back, run.result.cell_types[0])
    assert err.value.code == "damaged_model_state"
    assert f"the DestVI model state (uns['destvi_model']) is damaged: {named}" in str(err.value)


@pytest.mark.skipif(devices.gpu_driver_visible(), reason="a GPU driver is present: auto asks torch")
def test_auto_without_a_gpu_driver_names_the_cpu_without_importing_torch():
    code = (
        "import sys; from spatial_deconv_gui.engines import devices; "
        "print(devices.resolve('auto')[1]); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["--device auto: no GPU driver found; running on the CPU.", "False"]
