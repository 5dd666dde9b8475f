"""bench/gpu_acceptance.py runs its whole code path at demo size on the CPU (`--tiny --device cpu`),
so the one-shot GPU run cannot rot: every section runs and its JSON line has sane figures."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.kernel import InstalledKernels, choose_backend
from mochi_xdit.mochi.planner.simulate import count_step, weight_bytes

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_acceptance.py"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def figures() -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu"], capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1])  # the last line is the JSON


def test_attention_and_fp8_checks_name_the_cpu_paths_and_pass(figures):
    assert figures["device"] == "cpu" and figures["tiny"] is True
    attention = figures["attention"]
    assert attention["kernel"] == attention["ring_kernel"] == "cpu_flash"
    assert attention["ok"] and attention["max_abs_error"] < 1e-4  # fp32 on the CPU
    fp8 = figures["fp8"]
    assert fp8["compute"] == "cast" and fp8["within_fp8_rounding"] and fp8["fast_accumulation_within_fp8_rounding"]
    assert 0 < fp8["relative_error"] < 2.0**-4 and 0 < fp8["fast_accumulation_relative_error"] < 2.0**-4
    assert fp8["tflops"] > 0 and fp8["fast_accumulation_tflops"] > 0
    choice = fp8["pool_choice"]  # what a pool keeps: the CPU casts, nothing is measured
    assert choice["fast_accumulation"] is False and choice["relative_errors"] is None
    assert "not measured" in choice["note"]
    assert "cudnn" in figures  # None on this CPU-only torch


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_dit_figures_are_timed_and_match_the_planner_counts(figures, dtype):
    dit = figures["dit"][dtype]
    assert dit["planned_weight_bytes"] == weight_bytes(DEMO_DIT_CONFIG, dtype)
    assert dit["weight_bytes"] is None and dit["build_seconds"] > 0  # no allocator to read on the CPU
    assert [run["video"] for run in dit["runs"]] == ["64x48x7", "64x48x13"]
    gpu_kernel = choose_backend("cuda", torch.bfloat16, False, "auto", InstalledKernels.detect())
    for run, frames in zip(dit["runs"], (7, 13)):
        planned = count_step(ParallelConfig(1, num_heads=DEMO_DIT_CONFIG.num_heads), 64, 48, frames, dtype, 256, True,
                             DEMO_DIT_CONFIG)
        assert run["planned_tflop_per_step"] == pytest.approx(planned.total_flops / 1e12)
        assert run["planned_peak_bytes"] == planned.peak_bytes
        assert run["planned_attention_kernel"] == gpu_kernel.value
        assert run["seconds_per_forward"] > 0 and run["seconds_per_step"] == pytest.approx(2 * run["seconds_per_forward"])
        assert run["achieved_tflops"] == pytest.approx(run["planned_tflop_per_step"] / run["seconds_per_step"])
        assert run["fraction_of_bf16_peak"] is None and run["peak_bytes"] is None and run["peak_ratio"] is None
        assert run["latent_finite"]


def test_vae_pool_and_nccl_sections_ran_or_say_why_not(figures):
    vae = figures["vae"]
    assert vae["video"] == "128x96x7" and vae["frames_out"] == 7 and vae["tiles"] == 2
    assert vae["seconds"] > 0 and vae["planned_peak_bytes"] > 0 and vae["finite"]
    pool = figures["pool"]
    assert pool["world_size"] == 1 and pool["ranks"] == 1 and pool["device"] == "cpu"
    assert pool["step_seconds"] > 0 and pool["latent_finite"]
    conv = figures["vae_conv"]
    assert conv["rank_keeps"] == "channels_last=False,cudnn_benchmark=False"  # the CPU keeps the default
    assert len(conv["seconds"]) == 4 and all(seconds > 0 for seconds in conv["seconds"].values())
    collectives = figures["collectives"]  # the NCCL section's code, rehearsed on gloo
    assert collectives["backend"] == "gloo" and collectives["ranks"] == 2 and collectives["video"] == "64x48x13"
    assert collectives["all_to_all_ms_per_block"] > 0 and collectives["bytes_per_rank_per_block"] > 0
    assert collectives["nccl_p2p_or_nvlink"] is None
    assert figures["multi_gpu"] == {"skipped": "NCCL runs on GPUs; this run is on the CPU", "estimate_s": 150}
    goals = figures["goals"]
    assert goals["attention_matches_math"] and goals["fp8_within_rounding"]
    assert goals["bf16_fraction_of_peak_ge_0.5"] is None and goals["peaks_within_10_percent"] is None
    assert figures["total_seconds"] > 0 and figures["failed_sections"] == []
    for key in ("attention", "fp8", "vae", "vae_conv", "pool", "collectives"):  # every section timed
        assert figures[key]["section_seconds"] > 0 and figures[key]["estimate_s"] > 0


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_section_is_recorded_and_found_not_dropped(capsys):
    script = load_script()

    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    part = script.guarded("DiT bf16 848x480x163", out_of_memory, video="848x480x163")
    assert part == {"video": "848x480x163", "error": "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"}
    assert "DiT bf16 848x480x163: FAILED (RuntimeError)" in capsys.readouterr().err
    figures = {"dit": {"bf16": {"runs": [{"video": "a"}, part]}}, "vae": {"error": "x"}, "pool": {}}
    assert script.failures(figures) == ["dit.bf16.runs[1]", "vae"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the full run would start")
def test_without_a_gpu_the_full_run_says_how_to_rehearse():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA GPU here; run with --tiny --device cpu" in done.stderr


def test_a_kernel_check_raising_type_error_falls_back_and_the_json_line_still_prints(monkeypatch, capsys):
    """An older FlashAttention-3 build raises TypeError, not RuntimeError: the check records it, the
    runs fall back, and the JSON line prints (exit status 1)."""
    script = load_script()

    def old_fa3(*args, **kwargs):
        raise TypeError("flash_attn_func() got an unexpected keyword argument 'return_attn_probs'")

    monkeypatch.setattr(script, "attention", old_fa3)
    status = script.main(["--tiny", "--device", "cpu", "--sections", "attention,fp8"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 1
    attention = figures["attention"]
    assert attention["ok"] is False and attention["error"].startswith("TypeError: flash_attn_func()")
    assert "fallback" in attention and figures["fp8"]["within_fp8_rounding"]
    assert figures["failed_sections"] == ["attention", "attention.fallback"]


def test_any_section_or_header_failure_is_recorded_and_the_json_line_prints(monkeypatch, capsys):
    script = load_script()

    def broken(run):
        raise TypeError("a section's own bug")

    run = script.Run(script.TINY, torch.device("cpu"), script.InstalledKernels(), "/nonexistent")
    figures = script.run_sections((script.Section(("new", "part"), 1, broken),
                                   script.Section(("later",), 1, lambda run: {"ran": True})), run)
    assert figures["new"]["part"]["error"] == "TypeError: a section's own bug" and figures["later"]["ran"]
    assert "new.part: FAILED (TypeError)" in capsys.readouterr().err

    monkeypatch.setattr(script.InstalledKernels, "detect", classmethod(lambda cls: broken(None)))
    status = script.main(["--tiny", "--device", "cpu", "--sections", "fp8"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 1 and figures["error"] == "TypeError: a section's own bug" and figures["failed_sections"] == ["run"]


def test_the_summary_prints_every_section_after_the_multi_gpu_runs(figures, capsys):
    """What a 2-GPU machine returns: several NCCL pool runs and sharded beside replicated (the loop over
    the pool runs once shadowed the summary's own lookup, so every later section failed to print)."""
    script = load_script()
    two_gpus = dict(figures, multi_gpu={"U2": {"degrees": "cfg1 x U2 x R1", "step_seconds": 0.5},
                                        "CFG2": {"degrees": "cfg2 x U1 x R1", "step_seconds": 0.4}},
                    sharded={"replicated": {"step_seconds": 0.2, "latent_finite": True},
                             "sharded": {"step_seconds": 0.21, "latent_finite": True}})
    script.print_summary(two_gpus)
    out = capsys.readouterr().out
    assert "NCCL pool U2: cfg1 x U2 x R1: step 0.500 s" in out and "NCCL pool CFG2: cfg2 x U1 x R1" in out
    assert "attention kernels measured:" in out
    assert "2-rank pool, sharded weights, 848x480x49 (demo DiT): step 0.210 s, finite True" in out
