"""The driver's shared latent files (`workers/shared_latent.py`), with this process standing in for
rank 0 (it maps the files by path, as a rank does, and writes x0 = 2 * latent). The contract: a
result handed to the sampler is never overwritten while anything still holds it (the tensor, a view,
a numpy array over it), its file is written again once nothing does, and results outlive `close()`.
"""

import gc
import glob
import os

import torch

from mochi_xdit.workers.shared_latent import SharedLatents, map_float32

SHAPE = (1, 12, 2, 4, 6)


def evaluate(shared: SharedLatents, latent: torch.Tensor, output_shape=None) -> tuple[torch.Tensor, str]:
    """One evaluation through the files; returns (the result, the output file rank 0 wrote)."""
    files = shared.send(latent, output_shape or tuple(latent.shape))
    source = map_float32(files.input_path, files.input_shape)
    map_float32(files.output_path, files.output_shape).copy_((source * 2).expand(files.output_shape))
    return shared.receive(), files.output_path


def test_held_results_are_never_overwritten_and_dropped_ones_are_reused():
    shared = SharedLatents()
    try:
        x = torch.randn(SHAPE)
        first, first_path = evaluate(shared, x)
        view = first[0, 3]  # only a view of the first result stays held
        as_numpy = evaluate(shared, x + 1)[0].numpy()  # only a numpy array over the second
        del first
        gc.collect()
        third, third_path = evaluate(shared, x + 2)
        assert torch.equal(view, 2 * x[0, 3]) and (as_numpy == (2 * (x + 1)).numpy()).all()
        assert third_path != first_path and torch.equal(third, 2 * (x + 2))
        del view, as_numpy, third
        gc.collect()
        assert evaluate(shared, x)[1] == first_path  # nothing held: the first file again
    finally:
        shared.close()


def test_a_sampler_loop_uses_two_output_files_and_results_outlive_close():
    shared = SharedLatents()
    x = torch.randn(SHAPE)
    x0 = None
    for step in range(5):  # k-diffusion's Euler holds the last x0 while asking for the next
        x0, _ = evaluate(shared, x)
        x = x + 0.1 * (x - x0)
    branches, _ = evaluate(shared, x, (2, *SHAPE))  # another output shape: its own file
    smaller, _ = evaluate(shared, x[:, :, :1])  # another input shape: new input and output files
    names = sorted(os.path.basename(path) for path in glob.glob(f"{shared.folder}/*"))
    assert [name.rstrip("0123456789") for name in names].count("output") == 4 and len(names) == 6
    shared.close()
    assert not os.path.exists(shared.folder)
    assert torch.equal(branches[1], 2 * x) and torch.equal(smaller, 2 * x[:, :, :1])  # still mapped, still theirs
