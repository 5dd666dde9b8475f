"""USP joint attention on real gloo ranks equals single-device joint attention (fp32, 1e-5).

One process-group launch per world size runs every layout and case (spawning is the slow part on a
2-core CI machine); each test then checks its share of the results against full attention computed
here. Cases cover token counts divisible and not divisible by the sequence degree (including a rank
holding only padding), text lengths 0, short and 256, and the issue's example: 49 frames at
848x480 = 14,310 video tokens on 4 sequence ranks.
"""

import functools
import time

import pytest
import torch
import torch.distributed as dist

from mochi_xdit.mochi.joint_attention import joint_attention
from mochi_xdit.mochi.parallel.config import ParallelConfig
from mochi_xdit.mochi.parallel.layout import ParallelContext
from mochi_xdit.mochi.parallel.ring import RingComm
from mochi_xdit.mochi.parallel.testing import run_ranks

pytestmark = pytest.mark.timeout(300)

TOLERANCE = 1e-5
EXAMPLE_TOKENS = 9 * 30 * 53  # 49 frames at 848x480: 9 latent frames of 60x106 -> 30x53 patches = 14,310

# (cfg, ulysses, ring) per world size; heads must be divisible by every ulysses degree used.
# World 2 and 3 layouts run in tests/test_parallel_dit.py (whole DiT), to keep CI to few launches.
LAYOUTS = {
    4: {"ulysses4": (1, 4, 1), "ring4": (1, 1, 4), "ulysses2_ring2": (1, 2, 2), "cfg2_ulysses2": (2, 2, 1), "cfg2_ring2": (2, 1, 2)},
}
HEADS = {4: 4}
HEAD_DIM = 8
# name -> (video tokens, text tokens, need_text)
CASES = {
    "s48_text0": (48, 0, True),
    "s35_text0": (35, 0, True),
    "s35_text7": (35, 7, True),
    "s48_text256": (48, 256, True),
    "s35_text256": (35, 256, True),
    "s5_text3": (5, 3, True),  # 4 ranks: shards of 2, 2, 1 and 0 real tokens
    "s1_text0": (1, 0, True),  # one real token, every other rank pure padding
    "s35_text7_no_text_out": (35, 7, False),
}
EXAMPLE_LAYOUT = "ulysses2_ring2"  # both mechanisms; the full-size attention is the slow case


def make_inputs(S: int, L: int, H: int, seed: int) -> list[torch.Tensor]:
    """video q, k, v [1, S, H, Dh] and text q, k, v [1, L, H, Dh], deterministic."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, H, HEAD_DIM, generator=generator) for n in (S, S, S, L, L, L)]


def case_list(world: int) -> list[tuple[str, tuple[int, int, bool]]]:
    cases = list(CASES.items())
    if world == 4:
        cases.append(("example_14310_text256", (EXAMPLE_TOKENS, 256, True)))
    return cases


def _comm_order_errors(ctx: ParallelContext) -> list[str]:
    """Out-of-order RingComm verbs raise (and leave the ring usable)."""
    comm = RingComm(ctx.ring_group, ctx.ring_ranks, ctx.ring_rank)
    messages = []
    for bad in (comm.wait, comm.commit):
        try:
            bad()
        except RuntimeError as error:
            messages.append(str(error))
    buffer = comm.send_recv(torch.full((3,), float(ctx.rank)))
    try:
        comm.send_recv(torch.zeros(3))
    except RuntimeError as error:
        messages.append(str(error))
    comm.commit()
    try:
        comm.send_recv(torch.zeros(3))
    except RuntimeError as error:
        messages.append(str(error))
    comm.wait()
    messages.append(f"received {buffer[0].item():.0f}")
    return messages


def _example_shard_lengths(ctx: ParallelContext) -> tuple[int, bool]:
    """Shard and gather the example's token count (cheap: 1 channel) without running attention."""
    tokens = torch.arange(EXAMPLE_TOKENS, dtype=torch.float32).view(1, EXAMPLE_TOKENS, 1)
    shard = ctx.shard_sequence(tokens, dim=1)  # [1, 3578, 1]
    return shard.shape[1], torch.equal(ctx.gather_sequence(shard, dim=1, length=EXAMPLE_TOKENS), tokens)


def rank_main(world: int) -> dict:
    """Runs on every rank: all layouts, all cases, in one process group."""
    results = {}
    try:
        ParallelContext(ParallelConfig(world_size=world * 2, ring_degree=world * 2))
    except ValueError as error:
        results["world_mismatch"] = str(error)
    for name, (cfg, ulysses, ring) in LAYOUTS[world].items():
        ctx = ParallelContext(ParallelConfig(world, cfg, ulysses, ring, num_heads=HEADS[world]))
        results[(name, "layout")] = dict(
            cfg_rank=ctx.cfg_rank, ring_rank=ctx.ring_rank, ulysses_rank=ctx.ulysses_rank, sp_rank=ctx.sp_rank,
            ulysses=ctx.ulysses_ranks, ring=ctx.ring_ranks, sp=ctx.sp_ranks, cfg=ctx.cfg_ranks,
        )
        if ring > 1:
            results[(name, "comm_order")] = _comm_order_errors(ctx)
        for case_name, (S, L, need_text) in case_list(world):
            if case_name.startswith("example") and name != EXAMPLE_LAYOUT:
                results[(name, "example_shard_lengths")] = _example_shard_lengths(ctx)
                continue
            video_q, video_k, video_v, text_q, text_k, text_v = make_inputs(S, L, HEADS[world], seed=S + L)
            shards = [ctx.shard_sequence(t, dim=1) for t in (video_q, video_k, video_v)]  # [1, S_l, H, Dh]
            before = dict(ctx.sent_bytes)
            video_out, text_out = joint_attention(
                *shards, text_q, text_k, text_v, ctx=ctx, video_len=S, need_text=need_text
            )
            sent = {kind: n - before.get(kind, 0) for kind, n in ctx.sent_bytes.items() if n != before.get(kind, 0)}
            results[(name, case_name)] = {
                "shard_len": shards[0].shape[1],
                "video": ctx.gather_sequence(video_out, dim=1, length=S),
                "text": text_out,
                "roundtrip": torch.equal(ctx.gather_sequence(shards[0], dim=1, length=S), video_q),
                "sent": sent,
            }
        ctx.close()
    return results


@functools.lru_cache(maxsize=None)
def launch(world: int) -> list[dict]:
    return run_ranks(rank_main, world, world, timeout_s=280, collective_timeout_s=60)


@functools.lru_cache(maxsize=None)
def reference(S: int, L: int, H: int, need_text: bool):
    return joint_attention(*make_inputs(S, L, H, seed=S + L), need_text=need_text)


LAYOUT_PARAMS = [(world, name) for world in LAYOUTS for name in LAYOUTS[world]]


@pytest.mark.parametrize("world, layout", LAYOUT_PARAMS, ids=[name for _, name in LAYOUT_PARAMS])
def test_usp_attention_matches_single_device(world, layout):
    results = launch(world)
    checked = 0
    for case_name, (S, L, need_text) in case_list(world):
        if case_name.startswith("example") and layout != EXAMPLE_LAYOUT:
            continue
        ref_video, ref_text = reference(S, L, HEADS[world], need_text)
        for rank, per_rank in enumerate(results):
            got = per_rank[(layout, case_name)]
            where = f"{layout} {case_name} rank {rank}"
            assert got["video"].shape == ref_video.shape, where
            assert (got["video"] - ref_video).abs().max().item() <= TOLERANCE, where
            if need_text:
                assert got["text"].shape == ref_text.shape, where
                if L:
                    assert (got["text"] - ref_text).abs().max().item() <= TOLERANCE, where
            else:
                assert got["text"] is None, where
            assert got["roundtrip"], where
            checked += 1
    assert checked >= len(CASES) * world


def test_example_49_frames_848x480_on_4_sequence_ranks():
    """14,310 tokens are not divisible by 4: shards of 3,578 (the last holds 3,576 and 2 pads). The
    attention values for this case are checked (ulysses 2 x ring 2) in the test above; every other
    4-sequence-rank layout shards and gathers it exactly."""
    results = launch(4)
    assert EXAMPLE_TOKENS == 14310 and EXAMPLE_TOKENS % 4
    for per_rank in results:
        assert per_rank[(EXAMPLE_LAYOUT, "example_14310_text256")]["shard_len"] == 3578
        for layout in ("ulysses4", "ring4"):
            assert per_rank[(layout, "example_shard_lengths")] == (3578, True)


# rank -> (cfg_rank, ring_rank, ulysses_rank, ulysses group, ring group, cfg group), by hand from
# rank = cfg_rank * SP + ring_rank * U + ulysses_rank.
EXPECTED_LAYOUT = {
    "ulysses2_ring2": {0: (0, 0, 0, [0, 1], [0, 2], [0]), 1: (0, 0, 1, [0, 1], [1, 3], [1]),
                       2: (0, 1, 0, [2, 3], [0, 2], [2]), 3: (0, 1, 1, [2, 3], [1, 3], [3])},
    "cfg2_ring2": {0: (0, 0, 0, [0], [0, 1], [0, 2]), 1: (0, 1, 0, [1], [0, 1], [1, 3]),
                   2: (1, 0, 0, [2], [2, 3], [0, 2]), 3: (1, 1, 0, [3], [2, 3], [1, 3])},
    "cfg2_ulysses2": {0: (0, 0, 0, [0, 1], [0], [0, 2]), 1: (0, 0, 1, [0, 1], [1], [1, 3]),
                      2: (1, 0, 0, [2, 3], [2], [0, 2]), 3: (1, 0, 1, [2, 3], [3], [1, 3])},
}


@pytest.mark.parametrize("layout", EXPECTED_LAYOUT)
def test_rank_layout_puts_ulysses_adjacent_and_cfg_farthest(layout):
    results = launch(4)
    for rank, per_rank in enumerate(results):
        got = per_rank[(layout, "layout")]
        assert (got["cfg_rank"], got["ring_rank"], got["ulysses_rank"], got["ulysses"], got["ring"], got["cfg"]) == (
            EXPECTED_LAYOUT[layout][rank]
        ), f"{layout} rank {rank}"


@pytest.mark.parametrize("layout", ["ulysses4", "ring4", "ulysses2_ring2", "cfg2_ulysses2", "cfg2_ring2"])
def test_bytes_sent_per_attention_match_theory(layout):
    """S = 48 tokens (no padding), D = 4 heads x 8, fp32: Ulysses 4(U-1)/U^2 x S/R x D, Ring
    2(R-1)/R x S x D/U, and the text output's head slices (L x D/U from each of U-1 peers)."""
    _, U, R = LAYOUTS[4][layout]
    S, L, D, b = 48, 256, 4 * HEAD_DIM, 4
    expected = {
        "ulysses": 4 * (U - 1) * (S // R) * D * b // U**2,
        "ring": 2 * (R - 1) * S * (D // U) * b // R,
        "text_gather": (U - 1) * L * (D // U) * b,
    }
    for rank, per_rank in enumerate(launch(4)):
        sent = per_rank[(layout, "s48_text256")]["sent"]
        assert {kind: sent.get(kind, 0) for kind in expected} == expected, f"{layout} rank {rank}"
        assert set(sent) <= set(expected), f"{layout} rank {rank} sent {sent}"


def test_ring_comm_verbs_out_of_order_raise():
    results = launch(4)
    for rank, per_rank in enumerate(results):
        messages = per_rank[("ring4", "comm_order")]
        assert "wait() without a committed exchange" in messages[0]
        assert "commit() with nothing queued" in messages[1]
        assert "send_recv() called twice" in messages[2]
        assert "while an exchange is in flight" in messages[3]
        assert messages[4] == f"received {(rank - 1) % 4}"  # ring4: the previous rank's tensor


def test_context_rejects_config_for_another_world_size():
    results = launch(4)
    for per_rank in results:
        assert "ParallelConfig is for 8 ranks but the process group has 4" in per_rank["world_mismatch"]
    assert not dist.is_initialized()  # nothing leaked into the test process


def fail_on_rank_one() -> None:
    """Rank 1 dies before a collective that rank 0 enters: rank 0 must time out, not hang."""
    if dist.get_rank() == 1:
        raise ValueError("rank one broke on purpose")
    dist.barrier()


def test_a_failing_rank_fails_the_launch_fast_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        run_ranks(fail_on_rank_one, 2, timeout_s=120, collective_timeout_s=5)
    message = str(error.value)
    assert "rank 1 failed" in message and "rank one broke on purpose" in message
    assert "rank 0 failed" in message  # its barrier timed out (or saw the peer close) instead of hanging
    assert time.monotonic() - start < 100
