"""One device resolver for every engine: auto / cpu / cuda[:N], with clear errors."""

from __future__ import annotations

import pytest
import torch

from spatial_deconv_gui.engines.devices import device_name, torch_device
from spatial_deconv_gui.io.errors import InputError


def test_auto_follows_what_torch_sees():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device_name("auto") == device_name(None) == device_name("") == expected
    assert torch_device() == torch.device(expected)


def test_cpu_and_torch_devices_pass_through():
    assert device_name("cpu") == "cpu"
    assert torch_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu"])
def test_unknown_devices_are_named(name):
    with pytest.raises(InputError) as err:
        device_name(name)
    assert err.value.code == "unknown_device" and name in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_an_input_error(name):
    with pytest.raises(InputError) as err:
        torch_device(name)
    assert err.value.code == "no_cuda"
