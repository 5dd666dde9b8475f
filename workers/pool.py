"""Driver side of the rank pool: start the actors, run requests in lockstep, turn any failure into
one `PoolError`.

Every call goes to every rank through one helper (`_gather`) that waits with a deadline and fails
fast: the first rank that dies or raises ends the wait (after a short grace to find the root
cause), the whole group is killed, and the pool is marked dead; `MochiService` builds a new one on
the next request. Failures get their kind in `failures.py`. There is no string dispatch: each verb
is a real actor method.
"""

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from .actor import RankWorker
from .capacity import RankResources
from .failures import FailureKind, PoolError, RunInterrupted, classify, describe, rank_behind, rank_exception
from .placement import RankPlacement, check_capacity
from .protocol import FileRendezvous, PoolSpec, RankInfo, RunResult, StepReport, TcpRendezvous
from .ray_runtime import RayConnection
from .shared_latent import BroadcastLatent, SharedLatents

ROOT_CAUSE_GRACE_S = 2.0  # after a first failure, how long to wait for a clearer one (a death) elsewhere
KILL_WAIT_S = 10.0  # how long shutdown waits for local actor processes to exit

_RemoteRankWorker = ray.remote(RankWorker)


def _valid_tokens_only(text):
    """A TextCondition without its padded positions. Exact: the DiT keeps only mask == 1 tokens
    (genmo's packing), and it ships ~1 MB instead of 4 MB per 256-token prompt (0 for an empty one)."""
    from ..mochi.text import TextCondition

    valid = text.mask[0].bool()  # [L]
    return TextCondition(text.features[:, valid].contiguous(), text.mask[:, valid].contiguous())  # [1, Lv, 4096]


class Pool:
    """N Ray actors, one per rank, holding the model; built from a `PoolSpec` on a `RayConnection`.

    Construction starts everything (placement, actors, process group, weights) and raises
    `PoolError` if any rank fails; no actor is left behind then. The ranks of a private pool meet
    through a file store (no port opened); a cluster pool's through rank 0's TCP store; one rank
    needs no store at all.

    Attributes:
        startup_seconds: {"ranks": actors up and grouped, "load": weights read}, for the driver's log.
        load_notes: rank 0's one-line notes from loading (weight placement, fp8 accumulation), for
            the driver's log.

    `log` receives rank 0's one-time lines from a run (the attention kernel it measured), which Ray
    does not forward by itself; default: the `mochi_xdit` logger at INFO.
    """

    def __init__(self, spec: PoolSpec, ray_connection: RayConnection, log: Callable[[str], None] | None = None):
        self.spec = spec
        self._log = log or logging.getLogger("mochi_xdit").info
        self.name = f"mochi_xdit-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._actors: list = []
        self._placement = None
        self._rendezvous_dir: str | None = None
        self.dead = False
        self.stopped_because: str | None = None  # set when the service stopped it (not a rank's failure)
        self.ranks: tuple[RankInfo, ...] = ()
        self.runtime = ray_connection
        self.startup_seconds: dict[str, float] = {}
        self.load_notes: tuple[str, ...] = ()
        per_rank = RankResources.for_device(spec.device, spec.cpu_threads)
        check_capacity(spec.parallel, per_rank)
        timeouts = spec.timeouts
        started = time.perf_counter()
        try:
            self._placement = RankPlacement(spec.parallel, per_rank, self.name)
            self._placement.wait_ready(timeouts.start_s)
            self._actors = [
                _RemoteRankWorker.options(
                    name=f"{self.name}-rank{rank}", num_cpus=per_rank.cpus, num_gpus=per_rank.gpus,
                    scheduling_strategy=self._placement.strategy(rank), runtime_env=self.runtime.actor_env,
                    max_restarts=0, max_task_retries=0,
                ).remote(rank, spec)
                for rank in range(spec.world_size)
            ]
            self.ranks = tuple(self._gather("start", [a.info.remote() for a in self._actors], timeouts.start_s))
            if spec.world_size > 1:
                rendezvous = self._rendezvous()
                self._gather("join_group", [a.join_group.remote(rendezvous) for a in self._actors], timeouts.start_s)
            self.startup_seconds["ranks"] = time.perf_counter() - started
            loading = time.perf_counter()
            self.load_notes = self._gather("load", [a.load.remote() for a in self._actors], timeouts.load_s)[0]
            self.startup_seconds["load"] = time.perf_counter() - loading
        except BaseException:
            self._kill()
            raise

    def _rendezvous(self) -> FileRendezvous | TcpRendezvous:
        """Where the ranks meet: a private folder on this machine, or rank 0's TCP store on a cluster."""
        if self.runtime.private:
            self._rendezvous_dir = tempfile.mkdtemp(prefix="mochi_xdit_rendezvous_")  # mode 0700
            return FileRendezvous(os.path.join(self._rendezvous_dir, "store"))
        host, port = self._gather("open_store", [self._actors[0].open_store.remote()], self.spec.timeouts.start_s)[0]
        return TcpRendezvous(host, port)

    # -- the one fan-out helper ----------------------------------------------------------------

    def _gather(self, verb: str, refs: list, timeout_s: float) -> list:
        """Wait for one call per rank (refs[i] is rank i's); return the results in rank order.

        On a death, an exception or the deadline, kill the whole pool and raise one PoolError naming
        the rank most likely at fault (`FailureKind.blame`): a dead process, then a rank's own error,
        then a rank still silent after the grace while its peers' collectives failed, and only then a
        peer whose collective timed out waiting for it.
        """
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        failures: dict[int, tuple[FailureKind, BaseException | None]] = {}
        deadline = time.monotonic() + timeout_s
        grace_end = None
        try:
            while pending:
                now = time.monotonic()
                end = deadline if grace_end is None else min(deadline, grace_end)
                if now >= end:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=end - now)
                for ref in ready:
                    rank = pending.pop(ref)
                    try:
                        results[rank] = ray.get(ref, timeout=0)
                    except (RayActorError, RayTaskError, GetTimeoutError) as error:
                        failures[rank] = (classify(error), error)
                        if grace_end is None:
                            grace_end = time.monotonic() + ROOT_CAUSE_GRACE_S
        except BaseException:  # KeyboardInterrupt while ranks run: their state is unknown
            self._kill()
            raise
        if (failures or pending) and self.stopped_because is not None:  # our own kill, from another thread
            self._kill()
            _settle(list(pending))
            raise PoolError(FailureKind.STOPPED, None, verb, f"the service stopped this pool while the call ran "
                            f"({self.stopped_because})")
        if failures:
            for rank in pending.values():  # still silent after the grace, while a peer failed
                failures[rank] = (FailureKind.RANK_SILENT, None)
            behind = self._rank_that_fell_behind(failures)
            if behind is not None:
                self._kill()
                raise PoolError(FailureKind.RANK_SILENT, behind[0], verb, behind[1])
            rank = min(failures, key=lambda r: (failures[r][0].blame, r))
            kind, error = failures[rank]
            self._kill()
            _settle(list(pending))
            if error is None:
                failed = sorted(r for r in failures if failures[r][1] is not None)
                cause = (f"rank {rank} gave no answer, while rank(s) {', '.join(map(str, failed))} failed waiting "
                         f"for it ({describe(failures[failed[0]][1])}); it hangs or was stopped")
                raise PoolError(kind, rank, verb, cause)
            raise PoolError(kind, rank, verb, describe(error), rank_exception(error)) from error
        if pending:
            silent = sorted(pending.values())
            self._kill()
            _settle(list(pending))
            who = f"rank {silent[0]} gave" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))} gave"
            raise PoolError(FailureKind.RANK_SILENT, silent[0], verb,
                            f"{who} no answer within {timeout_s:g} s (a rank hangs, or waits in a collective for "
                            "one that does; raise the Timeouts if the work is just slow)")
        return results

    def _rank_that_fell_behind(self, failures: dict) -> tuple[int, str] | None:
        """(rank, cause) when ranks died with no error of their own, every other rank that died died
        waiting inside a collective, and the collective counts single out one rank that fell behind;
        None otherwise (then the blame order decides).

        Why: on NCCL a collective that times out does not raise; the watchdog kills the waiting ranks,
        so they die together with (or before) the rank they waited for. The counts outlive them in
        the private pool's rendezvous folder (cluster pools keep the blame order)."""
        if self._rendezvous_dir is None:
            return None
        kinds = {kind for kind, _ in failures.values()}
        if FailureKind.RANK_DIED not in kinds or not kinds <= {FailureKind.RANK_DIED, FailureKind.RANK_SILENT,
                                                                FailureKind.COLLECTIVE}:
            return None
        from ..mochi.parallel.collective import ledger_path, read_ledger

        counts = {rank: read_ledger(ledger_path(self._rendezvous_dir, rank)) for rank in range(len(self.ranks))}
        if any(count is None for count in counts.values()):
            return None
        entered = {rank: count[0] for rank, count in counts.items()}
        rank = rank_behind(entered)
        if rank is None:
            return None
        died = sorted(r for r, (kind, _) in failures.items() if kind is FailureKind.RANK_DIED)
        if any(counts[r][0] == counts[r][1] for r in died if r != rank):  # a rank died outside a collective:
            return None  # its own death (e.g. killed for memory) is the likelier root cause
        others = sorted({count for r, count in entered.items() if r != rank})
        cause = (f"rank {rank} fell behind: it had entered {entered[rank]} collectives while the other ranks had "
                 f"entered {'/'.join(map(str, others))} and waited for it; then rank(s) {', '.join(map(str, died))} "
                 "died (NCCL's watchdog ends ranks stuck in a timed-out collective). It hung or was stopped")
        return rank, cause

    # -- requests ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a call (a run, a decode, evaluations) holds the pool right now."""
        return self._lock.locked()

    def _check_usable(self) -> None:
        if self.stopped_because is not None:
            raise PoolError(FailureKind.STOPPED, None, "use", f"the service stopped this pool ({self.stopped_because}); "
                            "ask the service for the pool again (MochiService.pool)")
        if self.dead:
            raise PoolError(FailureKind.BAD_REQUEST, None, "use", "this pool was stopped after an earlier failure "
                            "or shutdown; build a new one (MochiService.pool does that)")

    def sample(self, request, on_step=None, preview: bool = False, loras: tuple = ()) -> torch.Tensor:
        """`run(...)`'s latent: the VAE-space latent [B, 12, T, H, W] fp32."""
        return self.run(request, on_step, preview, loras).latent

    def run(self, request, on_step=None, preview: bool = False, loras: tuple = ()) -> RunResult:
        """Run one generation on every rank in lockstep; return the latent and the step cache's counts.

        Every rank runs the same step i at the same time. Step i + 1 is already queued on the ranks
        while the driver waits for step i and runs the callback, so no rank idles for a driver round
        trip; a stop therefore takes effect after at most one more step.

        Args:
            request: a `mochi.sampler.SampleRequest`.
            on_step: called with a `StepReport` after every step. Returning False stops the run
                (RunInterrupted); raising stops it and re-raises. Either way the ranks drop the run
                and the pool stays usable.
            preview: ask rank 0 for a small preview latent (model space) in each report.
            loras: `mochi.lora.LoraSpec`s active for this run (stacked); () runs the base model. The
                ranks switch in milliseconds and keep the base weights untouched.
        """
        with self._lock:
            self._check_usable()
            timeouts = self.spec.timeouts
            total = request.steps
            request_ref = ray.put(replace(request, positive=_valid_tokens_only(request.positive),
                                          negative=_valid_tokens_only(request.negative)))
            loras = tuple(loras)
            begun = [a.begin.remote(request_ref, loras) for a in self._actors]
            queued = [a.step.remote(0, preview) for a in self._actors]
            try:
                self._gather("begin", begun, timeouts.call_s)
            except PoolError:
                _settle(queued)
                raise
            for i in range(total):
                current = queued
                queued = [a.step.remote(i + 1, preview) for a in self._actors] if i + 1 < total else None
                try:
                    reports = self._gather("step", current, timeouts.step_s)
                except PoolError:
                    _settle(queued or [])
                    raise
                report = StepReport(i, total, max(r.seconds for r in reports), reports[0].preview)
                if on_step is None:
                    continue
                try:
                    keep_going = on_step(report)
                except BaseException:
                    self._cancel(queued)
                    raise
                if keep_going is False:
                    self._cancel(queued)
                    raise RunInterrupted(f"stopped by the progress callback after step {i + 1} of {total}")
            result = self._gather("finish", [a.finish.remote() for a in self._actors], timeouts.call_s)[0]
            for note in result.notes:
                self._log(f"Mochi xDiT: {note}")
            return result

    def set_loras(self, loras: tuple = ()) -> None:
        """Make exactly these `mochi.lora.LoraSpec`s active on every rank now (`run` does this itself
        for each run; this is for switching ahead of time and for measuring)."""
        with self._lock:
            self._check_usable()
            self._gather("set_loras", [a.set_loras.remote(tuple(loras)) for a in self._actors],
                         self.spec.timeouts.call_s)

    @contextmanager
    def evaluations(self, positive, negative, on_evaluation=None, loras: tuple = ()):
        """Hold the pool for a sampler that runs in this process (ComfyUI's own samplers): the ranks
        keep the prompts, and each call of the yielded function is one lockstep model evaluation.

        Usage: `with pool.evaluations(positive, negative) as evaluate: x0 = evaluate(x, sigma, cfg)`.
        `evaluate(latent, sigma, cfg)` takes a model-space latent [B, 12, T, H, W], sigma (a float,
        or a tensor/sequence of one per sample) and the CFG scale, and returns ComfyUI's denoised x0
        [B, 12, T, H, W] fp32 on CPU, CFG-combined on the ranks (cfg 1 skips the unconditional pass);
        with cfg None it returns both branches unguided, [2, B, 12, T, H, W] (conditional,
        unconditional). The result is the caller's: on a private pool it is rank 0's shared output
        file itself (no copy), never written again while anything holds it. Each call waits with the
        step deadline; the pool stays locked for other requests until the block ends, and an
        exception inside the block leaves the pool usable.

        Args:
            positive, negative: `mochi.text.TextCondition`s.
            on_evaluation: called with the slowest rank's compute seconds after each evaluation.
            loras: `mochi.lora.LoraSpec`s active for these evaluations; () is the base model.
        """
        from ..mochi.guidance import EvaluationRequest

        with self._lock:
            self._check_usable()
            timeouts = self.spec.timeouts
            request_ref = ray.put(EvaluationRequest(_valid_tokens_only(positive), _valid_tokens_only(negative)))
            self._gather("begin_evaluations", [a.begin_evaluations.remote(request_ref, tuple(loras))
                                               for a in self._actors], timeouts.call_s)

            # A private pool's ranks share this machine: the latents travel through shared files
            # (written once for every rank, x0 handed over in rank 0's file, no object store); a
            # cluster pool's through Ray to rank 0.
            shared = SharedLatents() if self.runtime.private else None

            def evaluate(latent: torch.Tensor, sigma, cfg: float | None) -> torch.Tensor:
                nonlocal shared
                self._check_usable()
                sigmas = [float(s) for s in torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)]
                files = None
                if shared is not None:
                    output_shape = tuple(latent.shape) if cfg is not None else (2, *latent.shape)
                    try:
                        files = shared.send(latent, output_shape)
                    except OSError:  # no room in shared memory: the object store for the rest of the block
                        shared.close()
                        shared = None
                if files is not None:
                    answers = self._gather("evaluate", [a.evaluate.remote(files, sigmas, cfg) for a in self._actors],
                                           timeouts.step_s)
                else:  # to rank 0 only (numpy: no pickling); the others receive it from rank 0 by broadcast
                    latent_ref = ray.put(latent.detach().to("cpu", torch.float32).contiguous().numpy())
                    elsewhere = BroadcastLatent(tuple(latent.shape))
                    answers = self._gather("evaluate", [a.evaluate.remote(latent_ref if rank == 0 else elsewhere,
                                                                          sigmas, cfg)
                                                        for rank, a in enumerate(self._actors)], timeouts.step_s)
                if on_evaluation is not None:
                    on_evaluation(max(seconds for _, seconds in answers))
                if files is not None:
                    return shared.receive()  # rank 0's output file, mapped
                return torch.from_numpy(answers[0][0].copy())  # writable, off the shared read-only buffer

            try:
                yield evaluate
            finally:
                try:
                    if not self.dead:
                        notes = self._gather("end_evaluations", [a.end_evaluations.remote() for a in self._actors],
                                             timeouts.call_s)[0]
                        for note in notes:
                            self._log(f"Mochi xDiT: {note}")
                finally:
                    if shared is not None:
                        shared.close()

    def _cancel(self, queued: list | None) -> None:
        """Let the already queued step finish, then drop the run on every rank."""
        if queued is not None:
            self._gather("step", queued, self.spec.timeouts.step_s)
        self._gather("cancel", [a.cancel.remote() for a in self._actors], self.spec.timeouts.call_s)

    def decode(self, latent: torch.Tensor, tiles=None) -> torch.Tensor:
        """Decode a VAE-space latent [B, 12, T, H, W] into video [B, 3, 6T-5, 8H, 8W] fp32 in [-1, 1].

        The tile plan is dealt round-robin to the ranks and the tiles are blended here in plan order,
        so the video equals the single-rank tiled decode (`mochi.vae_tiling.decode_tiled`) exactly,
        for any world size.

        Args:
            latent: VAE-space latent (a LATENT's samples).
            tiles: a `mochi.vae_tiling.TileSpec`, or None to let rank 0 size tiles to its free memory.
        """
        from ..mochi.vae_tiling import plan_tiles

        with self._lock:
            self._check_usable()
            if self.spec.vae_path is None:
                raise ValueError("this pool has no VAE; build it with vae_path to decode")
            timeouts = self.spec.timeouts
            latent = latent.detach().to("cpu", torch.float32)
            if tiles is None:
                tiles = self._gather("auto_tiles", [self._actors[0].auto_tiles.remote(tuple(latent.shape))],
                                     timeouts.call_s)[0]
            return self._tiles_over_ranks("decode_tiles", latent, plan_tiles(tuple(latent.shape), tiles),
                                          timeouts.decode_s)

    def encode(self, video: torch.Tensor, tiles=None) -> torch.Tensor:
        """Encode a video [B, 3, F, H, W] in [-1, 1] (F = 6k + 1; H, W multiples of 8) into the
        VAE-space latent mean [B, 12, k + 1, H/8, W/8] fp32.

        As `decode`: the tile plan is dealt round-robin to the ranks and blended here in plan
        order, so the latent equals the single-rank tiled encode
        (`mochi.vae_encoder_tiling.encode_tiled`) exactly, for any world size. Each rank's share
        is bounded by `Timeouts.decode_s`.

        Args:
            video: the video (`mochi.vae_encoder.images_to_video` makes it from ComfyUI frames).
            tiles: a `mochi.vae_encoder_tiling.EncodeTileSpec`, or None to let rank 0 size tiles.

        Raises CheckpointError (a ValueError) when the pool's VAE file has no encoder.
        """
        from ..mochi.checkpoint import require_vae_encoder
        from ..mochi.vae_encoder import check_video
        from ..mochi.vae_encoder_tiling import plan_encode_tiles

        with self._lock:
            self._check_usable()
            if self.spec.vae_path is None:
                raise ValueError("this pool has no VAE; build it with vae_path (a VAE file with an encoder) to encode")
            info, prefix = require_vae_encoder(self.spec.vae_path)
            config = _encoder_config(info, prefix)
            timeouts = self.spec.timeouts
            video = video.detach().to("cpu", torch.float32)
            check_video(video, config)  # fails here, before any rank is called
            if tiles is None:
                tiles = self._gather("auto_encode_tiles", [self._actors[0].auto_encode_tiles.remote(tuple(video.shape))],
                                     timeouts.call_s)[0]
            return self._tiles_over_ranks("encode_tiles", video, plan_encode_tiles(tuple(video.shape), tiles, config),
                                          timeouts.decode_s)

    def _tiles_over_ranks(self, verb: str, tensor: torch.Tensor, plan: list, timeout_s: float) -> torch.Tensor:
        """Deal the tile plan round-robin to the ranks, run `verb` (decode_tiles / encode_tiles) on
        each rank's share of the one shared input, and blend the results here in plan order, so the
        output equals the single-rank tiled result exactly for any world size."""
        from ..mochi.vae_tiling import assemble_tiles

        world = len(self._actors)
        shares = [plan[rank::world] for rank in range(world)]
        tensor_ref = ray.put(tensor)
        parts = self._gather(verb, [getattr(actor, verb).remote(tensor_ref, shares[rank])
                                    for rank, actor in enumerate(self._actors)], timeout_s)
        return assemble_tiles(plan, [(tile, out) for rank in range(world) for tile, out in zip(shares[rank], parts[rank])])

    # -- lifecycle -----------------------------------------------------------------------------

    def _kill(self) -> None:
        """Kill every actor and free the placement; the pool is dead afterwards."""
        self.dead = True
        actors, self._actors = self._actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if self._placement is not None:
            self._placement.remove()
            self._placement = None
        if self._rendezvous_dir is not None:
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
            self._rendezvous_dir = None
        if self.runtime.private:  # our own machine: wait until the processes are really gone
            deadline = time.monotonic() + KILL_WAIT_S
            for info in self.ranks:
                while _pid_alive(info.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)

    def shutdown(self, reason: str = "shut down") -> None:
        """Leave the process group politely (bounded wait), then kill every actor. `reason` is what a
        caller still holding this pool is told."""
        if self.dead:
            return
        self.stopped_because = reason
        refs = [a.shutdown.remote() for a in self._actors]
        ray.wait(refs, num_returns=len(refs), timeout=5.0)
        self._kill()


def _settle(refs: list) -> None:
    """Retrieve, and deliberately drop, the outcomes of calls a failed pool had queued (the surviving
    ranks' next step, which fails as "step(i) out of order" once a peer is gone). The root cause is
    already being raised; without this, Ray prints each never-retrieved error as "Unhandled error"
    when the reference is freed, which reads like a second bug. Bounded: the actors are killed."""
    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=KILL_WAIT_S)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - a follow-on of the failure already raised (see the docstring)
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _encoder_config(info, prefix: str):
    """The encoder's size from the VAE file's header (the driver plans tiles without loading it)."""
    from ..mochi.vae_encoder import VAEEncoderConfig

    return VAEEncoderConfig.from_shapes({k[len(prefix):]: t.shape for k, t in info.tensors.items() if k.startswith(prefix)})

