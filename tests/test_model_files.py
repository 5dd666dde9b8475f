"""A pool's files are identified by their content, not their path and mtime: a file renamed over
the DiT with the same mtime, or overwritten in place, gives another reuse key (the service rebuilds
the pool; tests/test_pool.py shows that on real Ray), and a file deleted or made unreadable gives
one typed line instead of a bare FileNotFoundError / PermissionError or "no such file"."""

import os
import shutil

import pytest
from safetensors.torch import save_file

from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, random_dit_state_dict, random_vae_state_dict
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.workers.model_files import ModelFileError, identify
from mochi_xdit.workers.options import Field, LoadChoices, OptionsError, resolve_load
from mochi_xdit.workers.protocol import PoolSpec

NOBODY = 65534


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    dit, other, vae = (str(folder / name) for name in ("dit.safetensors", "other.safetensors", "vae.safetensors"))
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), dit)
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=1), other)  # same shapes and size, other values
    save_file({f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG, seed=0).items()}, vae)
    return dit, other, vae


def _spec(dit: str, vae: str) -> PoolSpec:
    return PoolSpec(dit, vae, "fp32", ParallelConfig(1, num_heads=DEMO_DIT_CONFIG.num_heads))


def test_a_file_renamed_over_the_dit_with_the_same_mtime_changes_the_reuse_key(weights, tmp_path):
    dit = str(tmp_path / "dit.safetensors")
    shutil.copyfile(weights[0], dit)
    spec = _spec(dit, weights[2])
    before = spec.reuse_key()
    replacement = str(tmp_path / "new.safetensors")
    shutil.copyfile(weights[1], replacement)
    mtime = os.stat(dit).st_mtime_ns
    os.utime(replacement, ns=(mtime, mtime))
    os.replace(replacement, dit)
    assert os.stat(dit).st_mtime_ns == mtime and os.path.getsize(dit) == os.path.getsize(weights[0])
    after = spec.reuse_key()
    assert after != before
    assert after[0][0].change_from(before[0][0]) == "dit.safetensors was replaced by another file (new inode)"


def test_a_file_overwritten_in_place_with_its_mtime_put_back_changes_the_reuse_key(weights, tmp_path):
    dit = str(tmp_path / "dit.safetensors")
    shutil.copyfile(weights[0], dit)
    spec = _spec(dit, weights[2])
    before = spec.reuse_key()
    stat = os.stat(dit)
    with open(weights[1], "rb") as source, open(dit, "r+b") as target:  # same inode, new bytes
        target.write(source.read())
    os.utime(dit, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(dit).st_ino == stat.st_ino and os.stat(dit).st_mtime_ns == stat.st_mtime_ns
    assert spec.reuse_key() != before  # the change time moved (no user can set it back)


def test_an_unchanged_file_keeps_its_reuse_key(weights):
    spec = _spec(weights[0], weights[2])
    assert spec.reuse_key() == _spec(weights[0], weights[2]).reuse_key()


def test_a_deleted_file_is_one_typed_line(weights, tmp_path):
    dit = str(tmp_path / "dit.safetensors")
    shutil.copyfile(weights[0], dit)
    spec = _spec(dit, weights[2])
    os.remove(dit)
    with pytest.raises(ModelFileError) as raised:
        spec.reuse_key()
    assert str(raised.value) == f"dit file {dit}: no such file now; give the path of the .safetensors file"
    assert raised.value.role == "dit"
    with pytest.raises(OptionsError) as refused:
        resolve_load(LoadChoices(dit, weights[2]), plan=False)
    assert refused.value.field is Field.DIT and "no such file" in str(refused.value)


def _as_another_user(function):
    """`function()`'s result (or exception text) as seen by a user without our rights: root reads
    everything, so a root test process forks and drops to `nobody` for the call."""
    if os.geteuid() != 0:
        try:
            return function()
        except Exception as error:
            return f"{type(error).__name__}: {error}"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, send the answer, exit without cleanup
        try:
            os.close(read)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                answer = repr(function())
            except Exception as error:
                answer = f"{type(error).__name__}: {error}"
            os.write(write, answer.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.parametrize("closed", ["file", "folder"])
def test_an_unreadable_file_or_folder_says_permission_denied_not_no_such_file(weights, tmp_path, closed):
    folder = tmp_path / "models"
    folder.mkdir()
    os.chmod(tmp_path, 0o755)
    dit = str(folder / "dit.safetensors")
    shutil.copyfile(weights[0], dit)
    os.chmod(dit, 0o644)
    vae = str(folder / "vae.safetensors")
    shutil.copyfile(weights[2], vae)
    os.chmod(vae, 0o644)
    os.chmod(folder, 0o755)
    spec = _spec(dit, vae)
    os.chmod(dit if closed == "file" else folder, 0o000)
    try:
        from_service = _as_another_user(spec.reuse_key)
        from_loader = _as_another_user(lambda: resolve_load(LoadChoices(dit, vae), plan=False))
    finally:
        os.chmod(folder, 0o755)
        os.chmod(dit, 0o644)
    assert from_service.startswith(f"ModelFileError: dit file {dit}: permission denied now"), from_service
    assert from_loader.startswith(f"OptionsError: {dit}: permission denied"), from_loader
    assert "no such file" not in from_loader and "\n" not in from_loader
