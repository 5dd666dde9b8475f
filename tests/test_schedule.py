"""Schedules against their formulas, computed independently here."""

import pytest
import torch

from mochi_xdit.mochi.schedule import (
    cfg_schedule,
    comfy_simple_schedule,
    linear_quadratic_schedule,
    sigma_schedule,
)


def genmo_progress(i: int, n: int, tau: float = 0.025) -> float:
    """x_i from DESIGN.md section 3, written out term by term."""
    L = n // 2
    if i < L:
        return i * tau / L
    if i == n:
        return 1.0
    Q = n - L
    a = (L - tau * n) / (L * Q * Q)
    b = tau / L - 2 * (L - tau * n) / (Q * Q)
    c = a * L * L
    return a * i * i + b * i + c


@pytest.mark.parametrize("n", [64, 30])
def test_linear_quadratic_matches_formula(n):
    sigmas = linear_quadratic_schedule(n)
    assert len(sigmas) == n + 1
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    L = n // 2
    for i in [0, 1, L // 2, L - 1, L, L + 1, (L + n) // 2, n - 1, n]:
        assert sigmas[i] == pytest.approx(1.0 - genmo_progress(i, n), abs=1e-12), i
    # the threshold is reached exactly where the quadratic part starts, and it is continuous there
    assert sigmas[L] == pytest.approx(1.0 - 0.025, abs=1e-12)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:])), "sigmas must strictly decrease"


def test_linear_quadratic_known_values():
    # n = 64: linear part steps by 0.025 / 32 per step; midpoint of the quadratic part (i = 48)
    sigmas = linear_quadratic_schedule(64)
    assert sigmas[16] == pytest.approx(1 - 16 * 0.025 / 32, abs=1e-12)
    a = (32 - 1.6) / (32 * 32**2)
    b = 0.025 / 32 - 2 * (32 - 1.6) / 32**2
    assert sigmas[48] == pytest.approx(1 - (a * 48**2 + b * 48 + a * 32**2), abs=1e-12)


def test_linear_quadratic_custom_threshold_and_one_step():
    sigmas = linear_quadratic_schedule(10, threshold_noise=0.1, linear_steps=4)
    assert sigmas[4] == pytest.approx(0.9, abs=1e-12) and sigmas[-1] == 0.0
    assert linear_quadratic_schedule(1) == [1.0, 0.0]
    with pytest.raises(ValueError, match="linear_steps"):
        linear_quadratic_schedule(10, linear_steps=10)


def flow_sigma(k: int, shift: float = 6.0) -> float:
    """sigma(t) = shift t / (1 + (shift - 1) t), t = k / 1000, in float64."""
    t = k / 1000
    return shift * t / (1 + (shift - 1) * t)


@pytest.mark.parametrize("steps", [30, 64, 7])
def test_comfy_simple_schedule_shift6(steps):
    sigmas = comfy_simple_schedule(steps)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0.0
    # simple scheduler: entry x is table[-(1 + int(x * 1000 / steps))], table[j] = sigma((j + 1) / 1000)
    for x in range(steps):
        k = 1000 - int(x * 1000 / steps)
        assert sigmas[x] == pytest.approx(flow_sigma(k), abs=1e-6), x
    assert sigmas[0] == 1.0
    # spot values, shift 6, 30 steps: x = 15 -> k = 500 -> 3/3.5
    if steps == 30:
        assert sigmas[15] == pytest.approx(6 * 0.5 / 3.5, abs=1e-6)
        assert sigmas[29] == pytest.approx(flow_sigma(34), abs=1e-6)


@pytest.mark.parametrize("name", ["simple", "linear_quadratic"])
def test_denoise_truncates_like_comfy_ksampler(name):
    # KSampler.set_steps: new_steps = int(steps / denoise), keep the last steps + 1 sigmas
    full = sigma_schedule(name, int(10 / 0.6))
    got = sigma_schedule(name, 10, denoise=0.6)
    assert got == full[-11:]
    assert len(got) == 11 and got[-1] == 0.0 and got[0] < 1.0
    assert sigma_schedule(name, 10, denoise=1.0) == sigma_schedule(name, 10)


def test_cfg_schedule_and_errors():
    assert cfg_schedule(4.5, 3) == [4.5, 4.5, 4.5]
    assert cfg_schedule([6, 4.5, 1], 3) == [6.0, 4.5, 1.0]
    with pytest.raises(ValueError, match="one per step"):
        cfg_schedule([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="unknown schedule"):
        sigma_schedule("karras", 3)
    with pytest.raises(ValueError, match="denoise"):
        sigma_schedule("simple", 3, denoise=0.0)


def test_cfg_schedule_text_expands_counts_and_commas():
    from mochi_xdit.mochi.schedule import parse_cfg_schedule

    assert parse_cfg_schedule("4.5*40,1*24", 64) == (4.5,) * 40 + (1.0,) * 24
    assert parse_cfg_schedule(" 6, 5.5 ,5,4.5 ", 4) == (6.0, 5.5, 5.0, 4.5)
    assert parse_cfg_schedule("7*2, 1", 3) == (7.0, 7.0, 1.0)


@pytest.mark.parametrize("text,steps,message", [
    ("4.5*40,1*20", 64, r"covers 60 steps but steps=64; make the counts add up to 64"),
    ("4.5*x", 4, r"entry '4.5\*x' is not \"scale\" or \"scale\*steps\""),
    ("4.5*0,1*4", 4, r"entry '4.5\*0': the step count must be >= 1"),
    ("", 4, r"the cfg schedule is empty"),
    ("-1*4", 4, r"cfg=-1.0 must be >= 0"),
])
def test_cfg_schedule_text_errors_name_the_entry_and_the_fix(text, steps, message):
    from mochi_xdit.mochi.schedule import parse_cfg_schedule

    with pytest.raises(ValueError, match=message):
        parse_cfg_schedule(text, steps)
