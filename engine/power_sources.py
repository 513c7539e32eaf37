"""Where power readings come from: NVML for NVIDIA GPUs, RAPL for CPU packages.

Each source reports what its devices have and None for the rest. Opening one never raises:
`open_power_source` returns None and logs, once, why this machine has no power readings.
Nothing here changes a device's clocks or power limits; the sources only read.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from wattserve.engine.power import PowerReading, PowerSource

log = logging.getLogger("wattserve.power")

RAPL_ROOT = Path("/sys/class/powercap")


class NvmlPowerSource:
    name = "nvml"

    def __init__(self, nvml, handles: list):
        self._nvml = nvml
        self._devices = [(f"gpu{nvml.nvmlDeviceGetIndex(h)}", h) for h in handles]
        readers = {  # NVML's units: mJ, mW, MHz, percent
            "energy_j": lambda h: nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3,
            "power_w": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,
            "temperature_c": lambda h: float(
                nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
            "sm_clock_hz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM) * 1e6,
            "utilization": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100,
        }
        # Probed once: on a GPU without a quantity NVML raises NotSupported on every call.
        self._readers = {k: fn for k, fn in readers.items()
                         if _supported(lambda fn=fn: fn(handles[0]))}

    def read(self) -> list[PowerReading]:
        return [PowerReading(device=name, **{k: fn(h) for k, fn in self._readers.items()})
                for name, h in self._devices]

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class RaplPowerSource:
    """CPU package energy counters; they wrap at max_energy_range_uj, so the source keeps
    its own running total."""

    name = "rapl"

    def __init__(self, zones: list[Path]):
        self._zones = [((z / "name").read_text().strip(), z / "energy_uj",
                        int((z / "max_energy_range_uj").read_text())) for z in zones]
        self._last = [int(path.read_text()) for _, path, _ in self._zones]
        self._total_uj = [0] * len(self._zones)

    def read(self) -> list[PowerReading]:
        readings = []
        for i, (name, path, wrap) in enumerate(self._zones):
            raw = int(path.read_text())
            delta = raw - self._last[i]
            self._total_uj[i] += delta if delta >= 0 else delta + wrap
            self._last[i] = raw
            readings.append(PowerReading(device=name, energy_j=self._total_uj[i] / 1e6))
        return readings

    def close(self) -> None:
        pass


def open_power_source(device: torch.device, rapl_root: Path = RAPL_ROOT) -> PowerSource | None:
    """NVML for the GPU `device` runs on, RAPL for a CPU engine; None (logged) if unreadable."""
    if device.type == "cuda":
        source, why = _open_nvml(device)
    else:
        source, why = _open_rapl(rapl_root)
    if source is None:
        log.warning("no power metrics: %s", why)
    else:
        log.info("power readings from %s: %s", source.name,
                 ", ".join(r.device for r in source.read()))
    return source


def _open_nvml(device: torch.device) -> tuple[PowerSource | None, str]:
    try:
        import pynvml as nvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return None, f"NVML cannot start: {exc}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        handle = _nvml_handle(nvml, index)
    except nvml.NVMLError as exc:
        nvml.nvmlShutdown()
        return None, f"NVML cannot find CUDA device {index}: {exc}"
    if not _supported(lambda: nvml.nvmlDeviceGetPowerUsage(handle)):
        nvml.nvmlShutdown()
        return None, "NVML reports no power for this GPU (a MIG slice or a vGPU?)"
    return NvmlPowerSource(nvml, [handle]), ""


def _nvml_handle(nvml, index: int):
    # By UUID: CUDA_VISIBLE_DEVICES renumbers devices for torch, never for NVML. torch gives
    # the UUID without the "GPU-" that NVML's spelling has.
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except (nvml.NVMLError, AttributeError):
        return nvml.nvmlDeviceGetHandleByIndex(index)


def _open_rapl(root: Path) -> tuple[PowerSource | None, str]:
    # Package zones only (intel-rapl:0); their subzones (intel-rapl:0:0, cores) are inside them.
    zones = sorted(p for p in root.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", p.name))
    if not zones:
        return None, f"no GPU, and no RAPL energy counters under {root}"
    unreadable = [z for z in zones if not os.access(z / "energy_uj", os.R_OK)]
    if unreadable:
        return None, (f"RAPL counters ({unreadable[0]}/energy_uj) are readable only by root on "
                      "this kernel")
    return RaplPowerSource(zones), ""


def _supported(fn) -> bool:
    try:
        fn()
        return True
    except Exception:  # pynvml raises a class per NVML return code; any means "not here"
        return False
