"""`mochi-xdit generate --input-video in.mp4 --denoise 0.6`: a tiny mp4 written here with PyAV is
read, encoded on a 2-rank demo pool, re-noised and decoded; bad input videos and flags are
refused before any actor starts. Also --cfg-schedule."""

import os
import re
import subprocess
import sys

import av
import numpy
import pytest
import ray

from mochi_xdit import cli


def write_video(path, frames: int, width: int, height: int, fps: int = 24) -> str:
    """A small H.264 mp4 with a moving gradient (PyAV)."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            x = numpy.linspace(0, 255, width)[None, :, None] + 8 * i
            y = numpy.linspace(0, 255, height)[:, None, None]
            image = numpy.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(image.astype(numpy.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def test_cli_video_to_video_on_the_demo_writes_the_input_size_frames_and_fps(tmp_path):
    source = write_video(tmp_path / "in.mp4", frames=9, width=64, height=48, fps=24)
    output = tmp_path / "out.mp4"
    env = dict(os.environ, MOCHI_XDIT_DEMO_DIR=str(tmp_path / "demo"))
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "mochi_xdit", "generate", "--prompt", "a fox in autumn", "--input-video", source,
               "--denoise", "0.6", "--world-size", "2", "--steps", "4", "--cfg-schedule", "4.5*2,1*2",
               "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEMO model" in result.stderr
    assert "using the first 7 of its 9 frames (Mochi takes 6k+1)" in result.stderr
    assert "encoding the input video (tiles spread over the ranks); denoise 0.6" in result.stderr
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert round(float(stream.average_rate)) == 24  # the input's frame rate
    assert len(frames) == 7 and all(frame.shape == (48, 64, 3) for frame in frames)


@pytest.mark.parametrize("make, arguments, message", [
    (lambda p: write_video(p, 7, 72, 48), [], r"is 72x48: its width is not a multiple of 16; resize or crop it to 64 or 80"),
    (lambda p: write_video(p, 7, 64, 48), ["--frames", "6"], r"--frames=6: Mochi encodes 6k \+ 1 frames; use 1 or 7"),
    (lambda p: write_video(p, 7, 64, 48), ["--frames", "13"], r"--frames=13 but .* has 7 frames; use at most 7"),
    (lambda p: write_video(p, 7, 64, 48), ["--width", "128"], r"--width=128 but .* is 64x48; leave --width out"),
    (lambda p: write_video(p, 7, 64, 48), ["--denoise", "0"], r"--denoise: denoise=0.0 is outside \[0.01, 1.0\]"),
    (lambda p: p.write_bytes(b"not a video") and str(p), [], r"cannot read .* as a video"),
    (None, ["--denoise", "0.5"], r"--denoise=0.5 needs --input-video"),
    (None, ["--cfg-schedule", "4.5*3"], r"--cfg-schedule: cfg_schedule: the cfg schedule '4.5\*3' covers 3 steps but steps=8"),
])
def test_bad_input_videos_and_flags_are_refused_before_any_actor_starts(make, arguments, message, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    source = ["--input-video", make(tmp_path / "in.mp4")] if make else []
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--prompt", "a fox", *source, *arguments, "--output", str(tmp_path / "out.mp4")])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and re.search(message, error), error
    assert "Traceback" not in error and not ray.is_initialized()


def test_cfg_schedule_all_ones_plans_like_cfg_1(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    args = cli.build_parser().parse_args(["generate", "--prompt", "a fox", "--world-size", "2", "--steps", "4",
                                          "--cfg-schedule", "1*4", "--output", str(tmp_path / "out.mp4")])
    plan = cli.check_inputs(args)
    assert plan.run.cfg == (1.0,) * 4 and plan.parallel.cfg_degree == 1  # no negative pass: no CFG split


def test_frames_flag_takes_the_first_frames_and_the_video_sets_size_and_fps(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "demo"))
    source = write_video(tmp_path / "in.mp4", frames=13, width=64, height=32, fps=12)
    args = cli.build_parser().parse_args(["generate", "--prompt", "a fox", "--input-video", source, "--frames", "7",
                                          "--output", str(tmp_path / "out.mp4")])
    plan = cli.check_inputs(args)
    assert tuple(plan.input_video.frames.shape) == (7, 32, 64, 3) and plan.latent_shape == (1, 12, 2, 4, 8)
    assert (plan.fps, plan.run.denoise) == (12, 0.6)
    assert 0.0 <= plan.input_video.frames.min() and plan.input_video.frames.max() <= 1.0
