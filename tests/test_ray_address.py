"""Ray addresses are checked before anything is touched: their form, the extra `ray://` needs, and
whether anything listens there (a dead address used to retry for ~14 minutes). Also the Ray version
the pack accepts. No Ray is started here."""

import importlib.util
import os
import re
import socket
import time

import pytest

from mochi_xdit.workers import ray_runtime
from mochi_xdit.workers.ray_runtime import RayAddressError, address_problem, probe_address

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_RAY = (2, 56)  # CVE-2026-57516 was fixed in 2.56; the others earlier


@pytest.mark.parametrize("address", ["", "auto", "10.0.0.5:6379", "head-node:6379", "[::1]:6379"])
def test_good_address_forms_pass(address):
    assert address_problem(address) is None


@pytest.mark.parametrize("address", ["http://x y", "head", "host:99999", "ray:/host:1"])
def test_bad_address_forms_name_the_fix(address):
    assert "is not a Ray address" in address_problem(address)


def test_ray_client_address_without_the_client_extra_names_the_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real_find_spec(name, *a))
    assert 'pip install "ray[client]>=2.56"' in address_problem("ray://head:10001")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "grpc" else real_find_spec(name, *a))
    assert address_problem("ray://head:10001") is None


def test_an_address_with_nothing_behind_it_fails_in_seconds_naming_what_to_check():
    with socket.socket() as unused:  # a loopback port that nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RayAddressError) as raised:
        probe_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert f"'127.0.0.1:{port}'" in message and "ray start --head" in message and "left as it was" in message
    assert "refused the connection" in message and "within" not in message  # answered at once: no wait said


def test_auto_without_a_running_cluster_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(ray_runtime, "RAY_CURRENT_CLUSTER_FILE", str(tmp_path / "none"))
    with pytest.raises(RayAddressError, match="no Ray cluster is running on this machine"):
        probe_address("auto")


def test_a_fixed_ray_is_required_and_installed():
    import ray

    for name in ("pyproject.toml", "requirements.txt"):
        with open(os.path.join(REPO_ROOT, name)) as file:
            pins = re.findall(r"ray>=(\d+)\.(\d+)", file.read())
        assert pins and all((int(a), int(b)) >= FIXED_RAY for a, b in pins), (name, pins)
    assert tuple(int(part) for part in ray.__version__.split(".")[:2]) >= FIXED_RAY


def test_a_ray_connection_the_users_code_made_is_left_up_on_close(monkeypatch):
    """Ray already initialised by the caller's own code: the pack uses it, and closing the pack's
    connection must not shut the caller's Ray down."""
    import ray

    shut = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    monkeypatch.setattr(ray_runtime, "package_importable_here", lambda: True)
    connection = ray_runtime.RayConnection.connect(None)
    assert not connection.owned and not connection.private
    connection.close()
    assert shut == []
