"""Course conventions: device choice, seeding, profiles, progress bars."""

import pytest
import torch

from minisd import course


def test_device_falls_back_to_cpu_and_honours_prefer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(course, "_mps_available", lambda: False)
    assert course.get_device() == torch.device("cpu")
    assert course.get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda"):
        course.get_device("cuda")


def test_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(course, "_mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert course.get_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert course.get_device().type == "mps"


def test_seed_everything_makes_draws_repeatable():
    g1 = course.seed_everything(123)
    a, b = torch.randn(3), torch.randn(3, generator=g1)
    g2 = course.seed_everything(123)
    torch.testing.assert_close(torch.randn(3), a)
    torch.testing.assert_close(torch.randn(3, generator=g2), b)
    with pytest.raises(ValueError, match="non-negative int"):
        course.seed_everything(-1)


def test_profile_from_environment(monkeypatch):
    monkeypatch.delenv(course.PROFILE_ENV, raising=False)
    p = course.current_profile()
    assert p.quick and p.pick(quick=1, full=2) == 1
    monkeypatch.setenv(course.PROFILE_ENV, "FULL")
    assert course.current_profile().pick(quick=1, full=2) == 2
    monkeypatch.setenv(course.PROFILE_ENV, "medium")
    with pytest.raises(ValueError, match=r"MINISD_PROFILE='medium'.*quick.*full"):
        course.current_profile()


def test_progress_wraps_only_when_enabled():
    items = [1, 2, 3]
    assert course.progress(items, enabled=False) is items
    assert list(course.progress(items, enabled=True, disable=True)) == items


def test_hardware_describes_the_machine():
    info = course.hardware()
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["gpu"] is None or isinstance(info["gpu"], str)
