"""Joining a Ray cluster, on real Ray, every address on 127.0.0.1: a 2-node `ray.cluster_utils.Cluster`
with token auth on (and one with it off), joined by other processes with the right token, a wrong one, none, and without
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray then rewrites 127.0.0.1 to this machine's external
address and used to hang for minutes); then a pool across both nodes loses a node, and the next
request is refused at once with a capacity message instead of waiting 120 s for a bare TimeoutError.

Everything runs in one subprocess (one cluster) whose report the tests read.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import save_file

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict

TOKEN = "mochi-xdit-test-token-0123456789abcdef"
CONNECT_TIMEOUT_S = 20

JOINER = textwrap.dedent(
    """
    import sys, time
    from mochi_xdit.workers.service import MochiService

    service = MochiService(connect_timeout_s=float(sys.argv[2]))
    started = time.monotonic()
    try:
        service.connect(sys.argv[1])
        print("JOINED", flush=True)
    except Exception as error:
        print("REFUSED", type(error).__name__, round(time.monotonic() - started, 1), str(error).replace("\\n", " "),
              flush=True)
    finally:
        service.shutdown()
    """
)

CLUSTER_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    import torch
    from ray.cluster_utils import Cluster
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.mochi.sampler import SampleRequest
    from mochi_xdit.mochi.text import TextCondition
    from mochi_xdit.workers.protocol import PoolSpec, Timeouts
    from mochi_xdit.workers.service import MochiService

    dit, joiner, cases, timeout = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    report = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                           "include_dashboard": False})
    service = MochiService(log=report.setdefault("said", []).append)
    try:
        second = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        # other processes join (each with its own environment) while this one builds a pool
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE",
                                                                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        joiners = {name: subprocess.Popen([sys.executable, "-c", joiner, cluster.address, timeout],
                                          env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True) for name, env in cases.items()}
        spec = PoolSpec(dit, None, "fp32", ParallelConfig(2, 2, 1, 1, num_heads=4), ray_address=cluster.address,
                        timeouts=Timeouts(start_s=120, load_s=120, step_s=60, call_s=60, collective_s=10))
        pool = service.pool(spec)
        report["nodes"] = sorted({info.node_id for info in pool.ranks})
        request = SampleRequest(TextCondition(torch.ones(1, 4, 4096), torch.ones(1, 4, dtype=torch.long)),
                                TextCondition.empty(4), latent_shape=(1, 12, 2, 4, 4), seed=1, steps=2, cfg=4.5)
        pool.sample(request)
        cluster.remove_node(second, allow_graceful=False)  # a node is lost
        try:
            pool.sample(request)
        except Exception as error:
            report["run_after_loss"] = type(error).__name__
        import ray
        report["cpus_counted_by_ray_at_next_request"] = ray.cluster_resources().get("CPU")
        started = time.monotonic()
        try:
            service.pool(spec)
            report["next_request"] = "built"
        except Exception as error:
            report["next_request"] = f"{type(error).__name__}: {error}"
        report["next_request_s"] = time.monotonic() - started
        for name, process in joiners.items():
            report[name] = process.communicate(timeout=300)[0].strip().splitlines()[-1:]
    finally:
        service.shutdown()
        cluster.shutdown()
    print("REPORT", json.dumps(report), flush=True)
    """
)


TOKEN_OFF_SCRIPT = textwrap.dedent(
    """
    import ray
    from ray.cluster_utils import Cluster
    from mochi_xdit.workers.service import MochiService

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                           "include_dashboard": False})
    service = MochiService(connect_timeout_s=60)
    try:
        service.connect(cluster.address)
        print("JOINED", ray.cluster_resources().get("CPU"), flush=True)
    finally:
        service.shutdown()
        cluster.shutdown()
    """
)


@pytest.fixture(scope="module")
def cluster_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    dit = str(folder / "dit.safetensors")
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), dit)
    empty_home = folder / "home"
    empty_home.mkdir()
    ours = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cases = {
        "right_token": ours,
        "wrong_token": {**ours, "RAY_AUTH_TOKEN": "not-the-token"},
        "no_token": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HOME": str(empty_home)},
        "address_rewritten": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN},
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    token_off = subprocess.Popen([sys.executable, "-c", TOKEN_OFF_SCRIPT], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={**env, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    result = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, dit, JOINER, json.dumps(cases),
                             str(CONNECT_TIMEOUT_S)], capture_output=True, text=True, timeout=600, env={**env, **ours})
    off_out, off_err = token_off.communicate(timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    report = json.loads(lines[0].split(" ", 1)[1])
    report["token_off_cluster"] = (token_off.returncode, off_out.strip().splitlines()[-1:], off_err[-2000:])
    return report


def test_the_right_token_joins_and_a_cluster_without_token_auth_is_joined_too(cluster_report):
    assert cluster_report["right_token"] == ["JOINED"]
    code, out, err = cluster_report["token_off_cluster"]
    assert code == 0 and out == ["JOINED 1.0"], err


@pytest.mark.parametrize("case, source", [("wrong_token", "RAY_AUTH_TOKEN (environment)"),
                                          ("no_token", "nowhere (no token set)")])
def test_a_wrong_or_missing_token_is_named_with_where_ray_reads_it(cluster_report, case, source):
    [line] = cluster_report[case]
    kind, seconds, message = line.split(" ", 3)[1], float(line.split(" ", 3)[2]), line.split(" ", 3)[3]
    assert line.startswith("REFUSED RayAddressError"), line
    assert seconds <= CONNECT_TIMEOUT_S + 10, line
    assert f"its token comes from {source}" in message, message
    assert "Ray reads RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token" in message


def test_joining_127_0_0_1_without_the_loopback_setting_ends_at_the_deadline_and_says_what_to_set(cluster_report):
    [line] = cluster_report["address_rewritten"]
    assert line.startswith("REFUSED RayAddressError"), line
    assert float(line.split(" ", 3)[2]) <= CONNECT_TIMEOUT_S + 10, line
    assert f"did not finish within {CONNECT_TIMEOUT_S} s" in line
    assert "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 here too" in line


def test_after_a_node_is_lost_the_next_request_is_refused_at_once_naming_what_is_missing(cluster_report):
    assert len(cluster_report["nodes"]) == 2  # the pool spanned both nodes
    assert cluster_report["run_after_loss"] == "PoolError"
    outcome = cluster_report["next_request"]
    assert outcome.startswith("CapacityError: world_size=2 needs 2 CPUs but the Ray cluster (1 live node(s), 1 lost) "
                              "has 1"), outcome
    assert cluster_report["next_request_s"] < 30, cluster_report  # used to wait the 120 s start deadline
