"""GPU telemetry from NVML (pynvml, from the nvidia-ml-py package), sampled while a window or an epoch runs.

Where NVML or a GPU is missing the result says so ({"available": false, "reason": ...}); telemetry never
stops a benchmark.
"""

from __future__ import annotations

import statistics
import threading

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency, but a stripped environment may lack it
    pynvml = None


def nvml_index(cuda_index: int) -> int:
    """NVML numbers GPUs by PCI bus; CUDA by CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER. torch knows the
    mapping (private helper, hence the fallback)."""
    try:
        import torch

        return torch.cuda._get_nvml_device_index(cuda_index)
    except Exception:
        return cuda_index


def summary(samples: list[dict]) -> dict:
    """The samples' means (None for a key no sample has), and the largest memory_used_gib as
    memory_used_peak_gib: a mean hides a pool that grew late in the window, and the peak is what must fit.
    The peak is of the samples, so a spike shorter than the interval can fall between two of them."""
    result = {}
    for key in ("gpu_util_pct", "sm_clock_mhz", "power_w", "memory_used_gib", "pcie_rx_mb_s"):
        values = [s[key] for s in samples if key in s]
        result[key] = statistics.fmean(values) if values else None
    result["memory_used_peak_gib"] = max((s["memory_used_gib"] for s in samples if "memory_used_gib" in s),
                                         default=None)
    return result


def open_nvml(device_index: int | None) -> tuple[object | None, str | None]:
    """NVML's handle of CUDA device `device_index`, and None; or None and why it cannot be read (no GPU,
    no pynvml, no driver or no permission): never an exception."""
    if device_index is None:
        return None, "no GPU"
    if pynvml is None:
        return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(nvml_index(device_index)), None
    except Exception as exc:  # NVMLError: no driver, no permission
        return None, f"NVML unavailable: {exc}"


class Telemetry:
    """Samples one GPU every `interval` seconds in a background thread between start() and stop()."""

    def __init__(self, device_index: int | None, interval: float = 0.1):
        self.interval = interval
        self.handle, self.reason = open_nvml(device_index)
        self._samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = None
        self._energy_start = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _energy_mj(self):
        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # millijoules since driver load
        except Exception:  # pre-Volta GPUs lack the counter
            return None

    def _sample(self) -> dict:
        util = pynvml.nvmlDeviceGetUtilizationRates(self.handle)
        sample = {
            "gpu_util_pct": util.gpu,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(self.handle, pynvml.NVML_CLOCK_SM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3,
            "memory_used_gib": pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30,
        }
        try:  # KB/s over the last 20 ms
            rx = pynvml.nvmlDeviceGetPcieThroughput(self.handle, pynvml.NVML_PCIE_UTIL_RX_BYTES)
            sample["pcie_rx_mb_s"] = rx / 1e3
        except Exception:
            pass
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._samples.append(self._sample())
            except Exception:
                pass

    def start(self) -> None:
        if not self.available:
            return
        self._samples, self._stop = [], threading.Event()
        self._energy_start = self._energy_mj()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self, images: int) -> dict:
        """Summary of the samples since start(); `images` processed in that time give joules per image."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        self._stop.set()
        self._thread.join()
        energy_end = self._energy_mj()
        result = {"available": True, "samples": len(self._samples), **summary(self._samples)}
        if self._energy_start is not None and energy_end is not None and images:
            result["energy_j_per_image"] = (energy_end - self._energy_start) / 1e3 / images
        else:
            result["energy_j_per_image"] = None
        return result
