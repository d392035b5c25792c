"""reformer_jax.training.runtime_memory: the RSS sampler against a known allocation, and the runtime figure's two
paths (a device's peak counter, faked here; the CPU's sampled RSS)."""

import os
import time

import numpy as np
import psutil
import pytest

from reformer_jax.training import runtime_memory


def test_the_sampler_sees_an_allocation_made_inside_its_block():
    size = 64 * 2**20
    base = psutil.Process().memory_info().rss
    with runtime_memory.RSSSampler(interval_s=0.001) as sampler:
        block = np.ones(size, np.uint8)  # every page written: resident
        time.sleep(0.2)  # held while the sampler's thread runs (the fill itself holds the GIL)
        del block
    assert sampler.max_rss - base >= 0.9 * size, (sampler.max_rss - base) / 2**20
    assert runtime_memory.peak_rss_bytes() >= base + 0.9 * size  # the kernel's high-water mark saw it too


def test_device_path_with_a_fake_stats_source(tmp_path):
    fake = {"peak_bytes_in_use": 123_456_789, "bytes_in_use": 1000, "bytes_limit": 2**34}
    assert runtime_memory.device_peak_fields(fake)["runtime_peak_bytes"] == 123_456_789
    for bad in (None, {}, {"bytes_in_use": 5}):
        with pytest.raises(ValueError, match="peak_bytes_in_use"):
            runtime_memory.device_peak_fields(bad)
    profile = tmp_path / "device.prof.gz"
    result = runtime_memory.runtime_fields(lambda: fake, compile_peak_bytes=100_000_000, rss_base=0, rss_max=1,
                                           profile_path=str(profile))
    assert result["runtime_source"] == "memory_stats.peak_bytes_in_use"
    assert result["runtime_peak_bytes"] == 123_456_789 and result["device_bytes_limit"] == 2**34
    assert result["runtime_over_compile"] == pytest.approx(1.23456789)
    assert os.path.getsize(result["device_memory_profile"]) > 0


def test_cpu_path_is_the_sampled_rss_above_the_baseline():
    cpu = runtime_memory.runtime_fields(lambda: None, compile_peak_bytes=1000, rss_base=5000, rss_max=7000)
    assert cpu["runtime_peak_bytes"] == 2000 and cpu["runtime_over_compile"] == 2.0 and "RSS" in cpu["runtime_source"]
