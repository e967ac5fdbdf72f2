"""Device selection and naming: one device per xdist worker, device classes for the floors, and
GPU execution providers probed rather than required."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import onnxruntime
import pytest

from tooling import pytest_plugin
from tooling.backends.base import BackendConfig, worker_device
from tooling.backends.gpu import OrtCudaBackend, OrtTensorRtBackend, cuda_device_class
from tooling.model_spec import PROJECT_ROOT

pytest_plugins = ["pytester"]


@pytest.mark.parametrize(("devices", "worker", "expected"), [
    ("0,1", "gw0", "0"),
    ("0,1", "gw1", "1"),
    ("0,1", "gw2", "0"),
    ("0,1", "gw3", "1"),
    ("4,5,6", "gw7", "5"),
    ("2, 3", "gw1", "3"),
    ("0,1", None, "0"),  # no xdist: the controller runs everything on the first device
    ("0,1", "master", "0"),
    ("7", "gw5", "7"),
    (None, "gw1", None),
])
def test_worker_takes_device_n_modulo_the_count(devices, worker, expected):
    assert worker_device(devices, worker) == expected


@pytest.mark.parametrize("devices", ["0,,1", "npu0", "0;1"])
def test_malformed_device_lists_are_refused(devices):
    with pytest.raises(ValueError, match="comma-separated integers"):
        worker_device(devices, "gw0")


@pytest.mark.parametrize(("name", "device_class"), [
    ("Tesla T4", "T4"),
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100"),
    ("NVIDIA H100 NVL", "H100"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
])
def test_cuda_device_names_reduce_to_the_class_floors_use(name, device_class):
    assert cuda_device_class(name) == device_class


def test_gpu_execution_providers_are_probed_not_required(monkeypatch):
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: with_cuda)
    assert OrtCudaBackend(BackendConfig(device="1")).availability().ok
    trt = OrtTensorRtBackend().availability()
    assert not trt.ok
    assert "no TensorrtExecutionProvider" in trt.reason and "CUDAExecutionProvider" in trt.reason

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    cuda = OrtCudaBackend().availability()
    assert not cuda.ok and "pip install onnxruntime-gpu" in cuda.reason


def run_pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """A pytest run with the zoo plugin over tests that log which device each worker was given."""
    (tmp_path / "test_device.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_device(zoo, worker_id, n):
            with open(%r, "a") as log:
                log.write(f"{worker_id} {zoo.options.device}\\n")
    """ % str(tmp_path / "devices.log")))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tooling.pytest_plugin", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), str(tmp_path / "test_device.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )


def test_devices_option_pins_each_xdist_worker(tmp_path):
    done = run_pytest(tmp_path, "-n", "2", "--devices", "4,5")
    assert done.returncode == 0, done.stdout + done.stderr
    seen = {tuple(line.split()) for line in (tmp_path / "devices.log").read_text().splitlines()}
    assert seen and seen <= {("gw0", "4"), ("gw1", "5")}


def test_device_and_devices_are_exclusive(pytester):
    """The run's workspace (what the ``zoo`` fixture hands every test) refuses both at once; the
    command line parsed in this process, as the child run above parses it."""
    config = pytester.parseconfig("-p", "tooling.pytest_plugin", "--devices", "0,1", "--device", "0")
    with pytest.raises(pytest.UsageError, match="--device and --devices are exclusive"):
        pytest_plugin._workspace(config)
