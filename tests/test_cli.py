"""The command line: a 2-rank CPU run of the demo model writes a playable mp4 of the right size and
frame count; bad inputs are refused before Ray or any actor starts, with a message naming the fix."""

import importlib
import os
import re
import subprocess
import sys
import time

import av
import pytest
import ray

from mochi_xdit import cli


def test_cli_writes_a_playable_mp4_with_the_right_frames_and_size(tmp_path):
    output = tmp_path / "fox.mp4"
    env = dict(os.environ, MOCHI_XDIT_DEMO_DIR=str(tmp_path / "demo"))
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "mochi_xdit", "generate", "--prompt", "a red fox running through snow",
               "--world-size", "2", "--width", "64", "--height", "48", "--frames", "7", "--steps", "3",
               "--cache", "first_block", "--cache-threshold", "0.9", "--output", str(output)]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=str(tmp_path))
    lines, final_line_at = [], None
    for line in process.stderr:  # when each line arrives: the final one says how long the command took
        lines.append(line)
        if line.startswith("wrote "):
            final_line_at = time.monotonic() - started
    result = subprocess.CompletedProcess(command, process.wait(timeout=400), None, "".join(lines))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEMO model" in result.stderr  # says loudly that the output is noise
    said = result.stderr
    # first run: one phase line before the demo weights are written, no third-party progress bars
    assert said.index("writing the built-in demo model") < said.index("connected to a private Ray")
    assert "Writing model shards" not in said and "Loading weights" not in said and "it/s]" not in said
    reported = float(re.search(r"in ([0-9.]+) s", said.splitlines()[-1]).group(1))
    assert reported >= final_line_at - 1.5, (reported, final_line_at)  # counted from the start of the command
    assert "starting 2 rank(s)" in result.stderr
    assert "step cache (first_block, threshold 0.9): computed" in result.stderr
    for phase in ("DEMO model", "connected to a private Ray on 127.0.0.1 in", "2 rank(s) up in",
                  "weights loaded in"):  # each phase said once, by the driver (not once per rank)
        assert result.stderr.count(phase) == 1 + (phase == "DEMO model"), (phase, result.stderr)
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.codec_context.name == "h264"
    assert len(frames) == 7
    assert all(frame.shape == (48, 64, 3) for frame in frames)
    assert max(frame.std() for frame in frames) > 0  # decoded pixels, not a blank video


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--frames", "30"], r"--frames: frames=30: Mochi makes 6k\+1 frames; use 25 or 31"),
        (["--width", "100"], r"--width: width=100 must be a multiple of 16; use 96 or 112"),
        (["--height", "8"], r"--height: height=8 is outside \[16, 8192\]"),
        (["--world-size", "2", "--ulysses", "3"], r"ulysses=3 does not divide 4 heads"),
        (["--world-size", "3", "--cfg-parallel", "2"], r"but world_size is 3"),
        (["--ulysses", "two"], r"--ulysses='two': give a positive integer or 'auto'"),
        (["--steps", "0"], r"--steps: steps=0 is outside \[1, 1000\]"),
        (["--dit", "/nonexistent/dit.safetensors"], r"give all of --dit, --vae and --t5 \(missing: --t5, --vae\)"),
        (["--dit", "/nonexistent/d.safetensors", "--vae", "/nonexistent/v.safetensors", "--t5", "/nonexistent/t5"],
         r"--dit /nonexistent/d.safetensors: no such file"),
        (["--output", "/nonexistent/folder/out.mp4"], r"folder /nonexistent/folder does not exist"),
        (["--output", "{tmp}"], r"is a directory; give a file name ending in .mp4"),
        (["--output", "{tmp}/out.gif"], r"give a path ending in .mp4"),
        (["--attention", "flash_attn"], r"--attention: attention_backend=flash_attn runs on CUDA GPUs only"),
        (["--lora", "/nonexistent/x.safetensors:0.5"], r"--lora /nonexistent/x.safetensors:0.5: no such file"),
        (["--lora", "{tmp}/out.mp4:nan"], r"--lora .*: LoRA strength=nan is outside"),
        (["--cache", "teacache", "--cache-threshold", "2"], r"--cache-threshold: cache_threshold=2.0 is outside \[0.0, 1.0\]"),
        (["--lora", "{tmp}/out.mp4:100"], r"--lora .*:100: LoRA strength=100.0 is outside \[-10.0, 10.0\] \(the LoRA node's"),
        (["--lora", "{tmp}/lora.safetensors:abc"], r"--lora .*:abc: strength 'abc' is not a number"),
        (["--world-size", "0"], r"--world-size: world_size=0 is outside \[1, 1024\]"),
        (["--ulysses", "-1"], r"--ulysses: ulysses_degree=-1 is outside \[0, 1024\]"),
        # the file system refuses these only when asked to create the file (they used to fail after the run)
        (["--output", "{tmp}/" + "f" * 296 + ".mp4"], r"the file name is 300 bytes, longer than this file system allows"),
        (["--output", "/proc/fox.mp4"], r"--output /proc/fox.mp4: cannot create the file there"),
    ],
)
def test_bad_input_is_refused_before_any_actor_starts(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    (tmp_path / "lora.safetensors").write_bytes(b"")
    if "--output" not in arguments:
        arguments += ["--output", str(tmp_path / "out.mp4")]
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--prompt", "a fox", *arguments])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert not ray.is_initialized()
    assert "Traceback" not in error


def test_more_ranks_than_cpus_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    world = (os.cpu_count() or 1) + 1
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--prompt", "a fox", "--world-size", str(world), "--ulysses", "1",
                  "--output", str(tmp_path / "out.mp4")])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and f"needs {world} CPUs but this machine has {world - 1}" in error, error
    assert "Traceback" not in error and not ray.is_initialized()


def test_cfg_1_with_a_cfg_split_runs_and_says_what_would_be_faster(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    args = cli.build_parser().parse_args(["generate", "--prompt", "a fox", "--world-size", "2", "--cfg-parallel", "2",
                                          "--cfg", "1", "--output", str(tmp_path / "out.mp4")])
    plan = cli.check_inputs(args)
    assert plan.parallel.cfg_degree == 2
    from mochi_xdit.workers.run_plan import layout_note

    assert "cfg_degree 1" in layout_note(plan.parallel, uses_cfg=False)
    auto = cli.check_inputs(cli.build_parser().parse_args(["generate", "--prompt", "a fox", "--world-size", "2", "--cfg",
                                                       "1", "--output", str(tmp_path / "out.mp4")]))
    assert auto.parallel.cfg_degree == 1  # automatic degrees know there is no negative pass


@pytest.mark.parametrize("text, path, strength", [
    ("my.safetensors:0.8", "my.safetensors", 0.8),
    ("my.safetensors:-1.5", "my.safetensors", -1.5),
    ("my.safetensors", "my.safetensors", 1.0),
    ("/loras/a:b.safetensors", "/loras/a:b.safetensors", 1.0),
    ("C:\\loras\\x.safetensors", "C:\\loras\\x.safetensors", 1.0),
    ("x.safetensors:0", "x.safetensors", 0.0),
])
def test_lora_flag_reads_file_and_strength(text, path, strength):
    assert cli.lora_flag(text) == (path, strength)


@pytest.mark.parametrize("text, message", [
    (":0.5", "give FILE[:STRENGTH]"), ("", "give FILE[:STRENGTH]"),
    ("x.safetensors:nan", "strength=nan is outside [-10.0, 10.0]"),
    ("x.safetensors:inf", "strength=inf is outside"), ("x.safetensors:100", "strength=100.0 is outside"),
])
def test_lora_flag_refuses_bad_text_with_the_nodes_limits(text, message):
    with pytest.raises(cli.InputError, match=re.escape(message)):
        cli.lora_flag(text)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_blamed_on_the_device_not_the_world_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "a fox", "--device", "cuda", "--output", str(tmp_path / "o.mp4")])
    error = capsys.readouterr().err
    assert "--device: device=cuda, but this machine has no CUDA GPU" in error and "world" not in error, error


def test_a_cache_threshold_without_a_cache_is_said_not_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    inputs = cli.check_inputs(cli.build_parser().parse_args(
        ["generate", "--prompt", "a fox", "--cache", "off", "--cache-threshold", "0.5", "--output", str(tmp_path / "o.mp4")]))
    assert inputs.run.cache is None
    assert any("cache_threshold=0.5 has no effect while cache is off" in note for note in inputs.run.notes)


def test_the_old_schedule_flag_still_works_and_the_demo_defaults_come_from_the_resolver(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    args = cli.build_parser().parse_args(["generate", "--prompt", "a fox", "--schedule", "simple",
                                          "--output", str(tmp_path / "o.mp4")])
    inputs = cli.check_inputs(args)
    assert inputs.run.scheduler == "simple" and inputs.run.steps == 8 and inputs.latent_shape == (1, 12, 3, 12, 16)
    assert args.steps is None and args.width is None  # nothing is set onto the parsed flags


@pytest.mark.parametrize("arguments, message", [
    (["--gpu", "XYZ"], "unknown GPU 'XYZ'"), (["--frames", "50"], "frames=50: Mochi makes 6k+1 frames"),
    (["--link", "fast"], "unknown link 'fast'"), (["--world-size", "0"], "--world-size 0: use 1 or more"),
    (["--steps", "0"], "--steps 0: use 1 or more"),
])
def test_plan_bad_input_is_one_line_not_a_traceback(arguments, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["plan", "--world-size", "1", *arguments])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and message in error and "Traceback" not in error, error


def test_help_answers_quickly_without_importing_torch_or_the_nodes():
    probe = ("import sys, time; t = time.perf_counter(); from mochi_xdit import cli; cli.build_parser().format_help(); "
             "print(time.perf_counter() - t, 'torch' in sys.modules, 'mochi_xdit.nodes' in sys.modules, "
             "'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.split()
    assert out[1:] == ["False", "False", "False"], out
    assert float(out[0]) < 1.0


def test_wrong_weight_file_is_refused_before_any_actor_starts(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from mochi_xdit.mochi.demo import demo_checkpoints

    dit, vae = demo_checkpoints(tmp_path / "demo")
    t5 = tmp_path / "t5"
    t5.mkdir()
    with pytest.raises(SystemExit):  # the VAE file given as the DiT
        cli.main(["generate", "--prompt", "x", "--dit", str(vae), "--vae", str(vae), "--t5", str(t5),
                  "--output", str(tmp_path / "o.mp4")])
    assert "Mochi DiT here: mochi_preview_bf16.safetensors" in capsys.readouterr().err
    save_file({"x": torch.zeros(1)}, str(tmp_path / "t5.safetensors"))
    with pytest.raises(SystemExit):  # a single T5 file without its tokenizer
        cli.main(["generate", "--prompt", "x", "--dit", str(dit), "--vae", str(vae),
                  "--t5", str(tmp_path / "t5.safetensors"), "--output", str(tmp_path / "o.mp4")])
    assert "also give --t5-tokenizer" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_plan_subcommand_prints_every_mix_and_a_recommendation(capsys):
    assert cli.main(["plan", "--width", "128", "--height", "96", "--frames", "13", "--world-size", "2",
                     "--gpu", "L40"]) == 0
    out = capsys.readouterr().out
    for mix in ("cfg2 x U1 x R1", "cfg1 x U2 x R1", "cfg1 x U1 x R2"):
        assert mix in out
    assert "Recommended:" in out


def test_auto_degrees_on_a_local_gpu_use_the_planner(tmp_path, monkeypatch):
    """`auto` on CUDA asks the planner for this video and GPU; explicit degrees never do."""
    import torch

    from mochi_xdit.mochi.demo import demo_checkpoints
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.workers import capacity
    planner_plan = importlib.import_module("mochi_xdit.mochi.planner.plan")  # the package re-exports a function `plan`

    dit, vae = demo_checkpoints(tmp_path / "demo")
    t5 = tmp_path / "t5"
    t5.mkdir()
    asked = []

    def fake_recommend(world_size, width, height, frames, **kwargs):
        asked.append((world_size, width, height, frames, kwargs["weight_dtype"], kwargs["steps"]))
        return ParallelConfig(world_size, 1, 1, world_size, num_heads=kwargs["config"].num_heads)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(capacity, "local_resources", lambda: (16, 2))  # a machine with 2 GPUs
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA L40")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index=0: type("Props", (), {"total_memory": 48 * 2**30})())
    monkeypatch.setattr(planner_plan, "recommend", fake_recommend)
    common = ["generate", "--prompt", "x", "--dit", str(dit), "--vae", str(vae), "--t5", str(t5),
              "--width", "64", "--height", "48", "--frames", "13", "--steps", "5", "--device", "cuda",
              "--world-size", "2", "--output", str(tmp_path / "o.mp4")]
    plan = cli.check_inputs(cli.build_parser().parse_args(common))
    assert asked == [(2, 64, 48, 13, "bf16", 5)]
    assert (plan.parallel.cfg_degree, plan.parallel.ulysses_degree, plan.parallel.ring_degree) == (1, 1, 2)
    explicit = cli.check_inputs(cli.build_parser().parse_args(common + ["--ulysses", "2"]))
    assert len(asked) == 1 and explicit.parallel.ulysses_degree == 2


def test_attention_choices_are_the_kernel_modules_backends():
    from mochi_xdit.mochi.parallel.kernel import AttentionBackend
    from mochi_xdit.workers.choices import ATTENTION_CHOICES

    assert ATTENTION_CHOICES == tuple(backend.value for backend in AttentionBackend)


def test_the_output_is_created_before_the_ranks_start_and_removed_when_the_run_fails(tmp_path, capsys, monkeypatch):
    from mochi_xdit.workers.failures import FailureKind, PoolError
    from mochi_xdit.workers.service import MochiService

    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    output = tmp_path / "fox.mp4"
    seen = []

    def failing_open(self, spec):
        seen.append(output.exists())  # the file is there before any rank starts
        raise PoolError(FailureKind.RANK_DIED, 0, "load", "the rank's process died (test)")

    monkeypatch.setattr(MochiService, "open", failing_open)
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--prompt", "a fox", "--output", str(output)])
    assert exited.value.code == 1 and seen == [True]
    assert not output.exists()  # nothing half-written is left behind
