"""`RankWorker`: one rank of the pool, run as one Ray actor (one GPU, or a few CPU threads).

The worker holds the model and the run state; the driver (`pool.py`) only sends small requests.
Its verbs check their own order and raise with the fix instead of returning None. The class is
plain Python: `pool.py` wraps it with `ray.remote`, and tests can call it directly.
"""

import logging
import os
import time
from datetime import timedelta

import numpy as np
import torch

from ..mochi.vae_conv import ConvSettings
from .protocol import LOOPBACK, FileRendezvous, PoolSpec, RankInfo, RunResult, StepReport, TcpRendezvous
from .shared_latent import BroadcastLatent, SharedLatentFiles, map_float32

logger = logging.getLogger(__name__)


def _node_id_and_ip() -> tuple[str, str]:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "local", LOOPBACK


def release_cached_memory(device: torch.device) -> None:
    """Hand the CUDA caching allocator's unused blocks back to the driver (a no-op off CUDA), so the
    next phase (decoding after sampling) and other processes on the GPU can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_device_bytes(device: torch.device) -> int:
    """Bytes a rank can still allocate on its GPU: the driver's free memory plus what the caching
    allocator holds unused (reserved but not allocated)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def process_group_backend(device: torch.device) -> tuple[str, torch.device | None]:
    """(backend, device_id) for `init_process_group` on a rank's device. On CUDA the device_id makes
    NCCL build its communicator at init (eagerly), so a bad GPU or link fails while the pool starts,
    not at the first step; gloo takes none."""
    if device.type == "cuda":
        return "nccl", device
    return "gloo", None


def _available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else 4 GiB."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


class RankWorker:
    """One rank: joins the process group, loads the weights from disk, runs its share of each step.

    Verb order: [`open_store` (rank 0 of a cluster pool)] -> `join_group` (worlds > 1) -> `load` -> then
    any number of runs `begin` -> `step(0..n-1)` -> `finish` (or `cancel`), and `decode_tiles` whenever
    loaded. A sampler running in the driver instead uses `begin_evaluations` -> `evaluate` (any
    number) -> `end_evaluations`.

    Args:
        rank: this worker's global rank.
        spec: the pool's spec (paths, dtype, degrees, device, threads, timeouts).
    """

    def __init__(self, rank: int, spec: PoolSpec):
        self.rank = rank
        self.spec = spec
        if spec.device == "cpu":
            torch.set_num_threads(spec.cpu_threads)
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            torch.cuda.set_device(self.device)
        self._store = None
        self.attention = self._attention_config(spec)
        self.ctx = None  # ParallelContext once the group exists (None for a world of one)
        self.kernels = None  # the pool's KernelChoice (attention kernel, measured once), made by load()
        self._notes: list[str] = []  # rank 0's one-time lines not yet handed to the driver (`_report`)
        self.fp8_accumulation = None  # the pool's Fp8Accumulation (fast or exact, measured once), made by load()
        self.dit = None
        self.vae = None
        self.vae_encoder = None  # loaded when the VAE file carries an encoder
        self.vae_conv = ConvSettings()  # the VAE's conv3d settings; measured at load on a GPU
        self._loop = None
        self._lora_switch = None  # made on first set_loras; tied to this rank's DiT
        self._guided = None  # GuidedDiT between begin_evaluations and end_evaluations
        self._shared = {}  # path -> the driver's shared latent buffers this rank mapped (evaluate)
        self._latent_buffer = None  # where a cluster pool's latent arrives (evaluate), reused

    # -- setup -------------------------------------------------------------------------------

    def _attention_config(self, spec: PoolSpec):
        """The requested attention backend with this rank's installed kernels; refused (with the
        install line) when it cannot run here."""
        from ..mochi.parallel.kernel import AttentionBackend, AttentionConfig, InstalledKernels, backend_problem

        backend = AttentionBackend.parse(spec.attention_backend)
        installed = InstalledKernels.detect()
        problem = backend_problem(backend, self.device.type, installed, spec.world_size)
        if problem is not None:
            raise ValueError(f"rank {self.rank}: {problem}")
        return AttentionConfig(backend, installed)

    def _report(self, line: str) -> None:
        """A one-time note (the kernel choice): printed to rank 0's Ray worker log and kept for the
        run's result, which carries it to the driver's log (`ray_runtime` connects with log_to_driver
        off, so the ranks' output does not reach it by itself)."""
        if self.rank == 0:
            print(f"Mochi xDiT rank 0: {line}", flush=True)
            self._notes.append(line)

    def info(self) -> RankInfo:
        """Where this rank runs, and where it imported our package from (the folder above workers/)."""
        node_id, node_ip = _node_id_and_ip()
        package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return RankInfo(self.rank, node_id, node_ip, os.getpid(), package_dir, os.nice(0))

    def open_store(self) -> tuple[str, int]:
        """Rank 0 of a cluster pool: open the TCP rendezvous store on a free port of this node and
        return (host, port). torch binds it on every interface: other nodes must reach it."""
        import torch.distributed as dist

        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank}: open_store() is rank 0's job; call it on rank 0 only")
        _, host = _node_id_and_ip()
        # Port 0: the OS picks a free port, bound before anyone learns it (no race, no fixed 29500).
        self._store = dist.TCPStore(host, 0, self.spec.world_size, is_master=True,
                                    timeout=timedelta(seconds=self.spec.timeouts.collective_s),
                                    wait_for_workers=False)
        return host, self._store.port

    def join_group(self, rendezvous: FileRendezvous | TcpRendezvous) -> None:
        """Form the default process group at the rendezvous, then this layout's subgroups."""
        import torch.distributed as dist

        from ..mochi.parallel.collective import CollectiveLedger
        from ..mochi.parallel.layout import ParallelContext

        world = self.spec.world_size
        timeout = timedelta(seconds=self.spec.timeouts.collective_s)
        if world == 1:
            raise RuntimeError("rank 0: join_group() in a world of one; a single rank runs without a process group")
        if dist.is_initialized():
            raise RuntimeError(f"rank {self.rank}: join_group() called twice; a pool forms its group once")
        if isinstance(rendezvous, FileRendezvous):
            store = dist.FileStore(rendezvous.path, world)
            store.set_timeout(timeout)
        elif self.rank == 0:
            if self._store is None:
                raise RuntimeError("rank 0: join_group() before open_store(); call open_store() on rank 0 first")
            store = self._store
        else:
            store = dist.TCPStore(rendezvous.host, rendezvous.port, world, is_master=False, timeout=timeout)
        self._store = store
        _, node_ip = _node_id_and_ip()
        if node_ip == LOOPBACK:  # a loopback-only Ray: keep gloo's and NCCL's sockets there too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        backend, device_id = process_group_backend(self.device)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=world, timeout=timeout,
                                device_id=device_id)
        ledger = None
        if isinstance(rendezvous, FileRendezvous):  # the driver can read a file there after ranks die
            ledger = CollectiveLedger(rendezvous.collective_ledger(self.rank))
        self.ctx = ParallelContext(self.spec.parallel, self.device, timeout=timeout, attention=self.attention,
                                   collectives=ledger)

    def load(self) -> tuple[str, ...]:
        """Read the weights from the spec's files (memory-mapped, each rank for itself) and place the
        DiT's blocks as the spec says (sharded and offloaded blocks are read into host memory first,
        so the whole DiT never sits on the GPU). Returns this rank's one-line notes for the driver's
        log (also logged here): the placement unless replicated, the fp8 accumulation choice for fp8
        weights."""
        import torch.distributed as dist

        from ..mochi.checkpoint import (inspect_checkpoint, load_dit, load_vae_decoder, load_vae_encoder,
                                       vae_encoder_prefix)
        from ..mochi.fp8_accumulation import choose_fp8_accumulation
        from ..mochi.guidance import default_compute_dtype
        from ..mochi.parallel.kernel_choice import KernelChoice
        from ..mochi.weight_placement import WeightPlacement, place_weights

        if self.spec.world_size > 1 and self.ctx is None:
            raise RuntimeError(f"rank {self.rank}: load() before join_group(); form the process group first")
        # one choice for the pool's life; every rank of the pool agrees on it (see kernel_choice)
        self.kernels = KernelChoice(self.attention, measure=True,
                                    group=dist.group.WORLD if self.ctx is not None else None, report=self._report)
        replicated = self.spec.weights is WeightPlacement.REPLICATED
        self.dit = load_dit(self.spec.dit_path, self.spec.weight_dtype, self.device if replicated else "cpu",
                            compile=self.spec.compile)
        note = f"rank {self.rank}: " + place_weights(self.dit, self.spec.weights, self.device)
        logger.info(note)
        # measured once (fp8 weights on a GPU with fp8 tensor cores), agreed by every rank, set on
        # every fp8 Linear before the compiled regions are built (they read it)
        self.fp8_accumulation = choose_fp8_accumulation(
            self.dit, self.device, default_compute_dtype(self.device),
            group=dist.group.WORLD if self.ctx is not None else None,
            ledger=None if self.ctx is None else self.ctx.collectives)
        logger.info(self.fp8_accumulation.note)
        # compiled regions built here, so that no rank is still building at the first collective
        # (options.py allows compile only where the block weights are resident)
        self.dit.compile_now(self.device, default_compute_dtype(self.device), joined=self.ctx is None)
        heads = self.dit.config.num_heads
        if heads % self.spec.parallel.ulysses_degree:
            raise ValueError(
                f"ulysses_degree={self.spec.parallel.ulysses_degree} does not divide this DiT's {heads} heads; "
                "choose a divisor and put the remaining factor on ring_degree"
            )
        if self.spec.vae_path is not None:
            from ..mochi.vae_conv import apply_memory_format, decoder_conv_shape, measure_conv_settings

            vae_dtype = "fp32" if self.device.type == "cpu" else "bf16"
            self.vae = load_vae_decoder(self.spec.vae_path, vae_dtype, self.device)
            # measured once on a GPU (a few seconds); the default elsewhere
            self.vae_conv, _ = measure_conv_settings(decoder_conv_shape(self.vae.config),
                                                     next(self.vae.parameters()).dtype, self.device)
            apply_memory_format(self.vae, self.vae_conv)
            if vae_encoder_prefix(inspect_checkpoint(self.spec.vae_path)) is not None:  # its encoder half, if any
                self.vae_encoder = load_vae_encoder(self.spec.vae_path, vae_dtype, self.device)
        notes = () if replicated else (note,)
        return notes + ((self.fp8_accumulation.note,) if self.spec.weight_dtype == "fp8" else ())

    # -- sampling ----------------------------------------------------------------------------

    def _require_loaded(self, verb: str) -> None:
        if self.dit is None:
            raise RuntimeError(f"rank {self.rank}: {verb} before load(); the pool loads the weights first")

    def begin(self, request, loras: tuple = ()) -> None:
        """Start a run with exactly these LoRAs active (`set_loras`; () = the base model): draw the
        noise and keep the request (replaces an unfinished run)."""
        from ..mochi.sampler import DenoiseLoop

        self._require_loaded("begin()")
        self._loop = None
        self.set_loras(loras)
        self._loop = DenoiseLoop(self.dit, request, self.ctx, device=self.device, attention=self.kernels)
        self._loop.begin()

    def step(self, i: int, preview: bool = False) -> StepReport:
        """Euler step i on this rank's share (lockstep: every rank runs the same i)."""
        if self._loop is None:
            raise RuntimeError(f"rank {self.rank}: step() before begin(); call begin(request) first")
        start = time.perf_counter()
        self._loop.step(i)
        seconds = time.perf_counter() - start
        small = None
        if preview and self.rank == 0:
            middle = self._loop.latent.shape[2] // 2
            small = self._loop.latent[:, :, middle : middle + 1].cpu()  # [B, 12, 1, H, W] model space
        return StepReport(i, self._loop.num_steps, seconds, small)

    def finish(self) -> RunResult | None:
        """End the run: on rank 0 the VAE-space latent [B, 12, T, H, W] fp32 and the step cache's
        counts (every rank decided the same steps), None on the others. The run's tensors are freed
        and the GPU cache emptied, so decoding gets the memory."""
        if self._loop is None:
            raise RuntimeError(f"rank {self.rank}: finish() before begin(); call begin(request) and run the steps first")
        latent = self._loop.finish().cpu()
        stats = self._loop.cache_stats if self._loop.request.cache is not None else None
        self._loop = None
        release_cached_memory(self.device)
        return RunResult(latent, stats, self._take_notes()) if self.rank == 0 else None

    def cancel(self) -> None:
        """Drop the current run, if any (interrupt between steps), and its memory."""
        self._loop = None
        release_cached_memory(self.device)

    # -- model evaluations for a sampler running in the driver (ComfyUI's own samplers) ----------

    def begin_evaluations(self, request, loras: tuple = ()) -> None:
        """Keep the prompts of a `mochi.guidance.EvaluationRequest` for the `evaluate` calls that
        follow, with exactly these LoRAs active (replaces an earlier set; drops an unfinished run)."""
        from ..mochi.guidance import EvaluationRequest, GuidedDiT

        self._require_loaded("begin_evaluations()")
        if not isinstance(request, EvaluationRequest):
            raise TypeError(f"rank {self.rank}: begin_evaluations() takes an EvaluationRequest, got {type(request)}")
        self._loop = self._guided = None
        self.set_loras(loras)
        self._guided = GuidedDiT(self.dit, request.positive, request.negative, self.ctx, device=self.device,
                                 attention=self.kernels)

    def evaluate(self, latent, sigmas: list[float], cfg: float | None) -> tuple[np.ndarray | None, float]:
        """One lockstep model evaluation (every rank runs the same call at the same time).

        In a private pool the latent comes in, and rank 0's result goes back, through the driver's
        shared files (`shared_latent.SharedLatents`: no object store, one copy for all ranks). In a
        cluster pool it reaches rank 0 as a numpy array (Ray moves those through its object store
        without pickling: an 8 MiB full-size latent's round trip took ~18 ms instead of ~50 ms as a
        tensor), and rank 0 broadcasts it to the others over the pool's process group.

        Args:
            latent: [B, 12, T, H, W] float32 model-space noisy latent: `SharedLatentFiles`, a numpy
                array or a tensor (rank 0 of a cluster pool, or a pool of one), or `BroadcastLatent`
                (the other ranks of a cluster pool).
            sigmas: one sigma per sample (or one for all).
            cfg: the CFG scale: returns the guided denoised x0 [B, 12, T, H, W] (1 skips the
                unconditional pass); None: returns both branches' denoised x0 [2, B, 12, T, H, W]
                (conditional, unconditional) for a sampler that combines them itself.

        Returns:
            (the fp32 result as a numpy array on rank 0, None elsewhere and when it went into the
            shared output file; this rank's compute seconds).
        """
        if self._guided is None:
            raise RuntimeError(f"rank {self.rank}: evaluate() before begin_evaluations(); send the prompts first")
        start = time.perf_counter()
        files = latent if isinstance(latent, SharedLatentFiles) else None
        if files is not None:  # a private pool: the driver's buffer, read in place (the DiT never writes it)
            latent = self._shared_buffer(files.input_path, files.input_shape)
        else:  # a cluster pool: the array reached rank 0 only; it broadcasts it to the others
            latent = self._broadcast_latent(latent)
        # rank 0 of a private pool writes x0 straight into the driver's shared output file
        target = self._shared_buffer(files.output_path, files.output_shape) if files and self.rank == 0 else None
        if cfg is None:
            out = self._guided.denoised_branches(latent, sigmas, out=target)  # [2, B, 12, T, H, W]
        else:
            out = self._guided.denoised(latent, sigmas, cfg, out=target)  # [B, 12, T, H, W]
        out = out.cpu().numpy() if self.rank == 0 and files is None else None
        return out, time.perf_counter() - start

    def _broadcast_latent(self, latent) -> torch.Tensor:
        """Rank 0's latent (a numpy array from Ray, read-only, or a tensor) on every rank, in a buffer on
        this rank's device reused while the shape stays; `BroadcastLatent` on the other ranks."""
        import torch.distributed as dist

        from ..mochi.parallel.collective import collective

        shape = latent.shape if isinstance(latent, BroadcastLatent) else tuple(latent.shape)
        if self._latent_buffer is None or tuple(self._latent_buffer.shape) != tuple(shape):
            self._latent_buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
        if isinstance(latent, BroadcastLatent):
            if self.ctx is None:
                raise RuntimeError(f"rank {self.rank}: evaluate() got no latent and has no process group to "
                                   "receive it by; send the latent to rank 0 of a pool of two or more ranks")
        else:
            self._latent_buffer.copy_(torch.as_tensor(latent) if not isinstance(latent, np.ndarray)
                                      else torch.from_numpy(latent))
        if self.ctx is not None:
            with collective("latent broadcast", self.ctx.collectives):
                dist.broadcast(self._latent_buffer, src=0)
        return self._latent_buffer

    def _shared_buffer(self, path: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The driver's shared file at `path`, mapped once per evaluations block."""
        if path not in self._shared:
            self._shared[path] = map_float32(path, shape)
        return self._shared[path]

    def end_evaluations(self) -> tuple[str, ...]:
        """Drop the prompts kept by `begin_evaluations` and the shared buffers mapped since; return
        rank 0's one-time lines from these evaluations (`_report`) for the driver's log."""
        self._guided = None
        self._shared = {}
        return self._take_notes()

    def _take_notes(self) -> tuple[str, ...]:
        notes, self._notes = tuple(self._notes), []
        return notes
        self._latent_buffer = None

    # -- decoding ----------------------------------------------------------------------------

    def decode_tiles(self, latent: torch.Tensor, tiles: list) -> list[torch.Tensor]:
        """Decode this rank's tiles of a VAE-space latent; returns one pixel tensor per tile, in order."""
        from ..mochi.vae_tiling import decode_tile

        if self.vae is None:
            raise RuntimeError(f"rank {self.rank}: decode_tiles() without a VAE; give vae_path when building the pool")
        latent = latent.to(self.device, next(self.vae.parameters()).dtype)  # [B, 12, T, H, W] in the VAE's dtype
        with self.vae_conv.active():
            return [decode_tile(self.vae, latent, tile).cpu() for tile in tiles]  # each [B, 3, 6T-5, 8h, 8w]

    def auto_tiles(self, latent_shape: tuple[int, ...]):
        """A TileSpec sized to this rank's free memory (every rank of a pool has the same kind of device)."""
        from ..mochi.vae_tiling import TileSpec

        if self.vae is None:
            raise RuntimeError(f"rank {self.rank}: auto_tiles() without a VAE; give vae_path when building the pool")
        if self.device.type == "cuda":
            available = free_device_bytes(self.device)
        else:  # ranks of a CPU pool share the machine's memory
            available = _available_host_bytes() // self.spec.world_size
        dtype = next(self.vae.parameters()).dtype
        return TileSpec.auto(available, self.vae.config, dtype, latent_shape=tuple(latent_shape))

    # -- encoding ----------------------------------------------------------------------------

    def encode_tiles(self, video: torch.Tensor, tiles: list) -> list[torch.Tensor]:
        """Encode this rank's tiles of a video [B, 3, F, H, W] in [-1, 1]; returns one latent mean
        [B, 12, t, h, w] per tile, in order."""
        from ..mochi.vae_encoder_tiling import encode_tile

        encoder = self._require_encoder("encode_tiles()")
        video = video.to(self.device, next(encoder.parameters()).dtype)  # [B, 3, F, H, W] in the VAE's dtype
        return [encode_tile(encoder, video, tile).cpu() for tile in tiles]

    def auto_encode_tiles(self, video_shape: tuple[int, ...]):
        """An EncodeTileSpec sized to this rank's free memory."""
        from ..mochi.vae_encoder_tiling import EncodeTileSpec

        encoder = self._require_encoder("auto_encode_tiles()")
        if self.device.type == "cuda":
            available = free_device_bytes(self.device)
        else:  # ranks of a CPU pool share the machine's memory
            available = _available_host_bytes() // self.spec.world_size
        dtype = next(encoder.parameters()).dtype
        return EncodeTileSpec.auto(available, encoder.config, dtype, video_shape=tuple(video_shape))

    def _require_encoder(self, verb: str):
        if self.vae_encoder is None:
            raise RuntimeError(f"rank {self.rank}: {verb} without a VAE encoder; build the pool with a vae_path "
                               "whose file has one (the driver checks this before calling)")
        return self.vae_encoder

    def shutdown(self) -> None:
        """Leave the process group (the driver kills the actor afterwards)."""
        import torch.distributed as dist

        self._loop = None
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- LoRAs -------------------------------------------------------------------------------

    def set_loras(self, specs: tuple) -> None:
        """Make exactly these LoRAs active on this rank's DiT (a tuple of `mochi.lora.LoraSpec`; they
        stack as a sum; () restores the base model bit for bit). Each rank reads the files itself.
        A no-op when the same files (same mtime and size) with the same strengths are already active.

        Raises:
            RuntimeError between begin() and finish() (a run keeps its LoRAs), LoraError for a file
            that is missing here, unreadable or does not fit this DiT.
        """
        from ..mochi.lora import LoraSwitch
        from ..mochi.sampler import default_compute_dtype

        self._require_loaded("set_loras()")
        if self._loop is not None:
            raise RuntimeError(f"rank {self.rank}: set_loras() during a run; call it before begin() or after "
                               "finish() / cancel()")
        switch = self._lora_switch
        if switch is None or switch.model is not self.dit:
            switch = self._lora_switch = LoraSwitch(self.dit, default_compute_dtype(self.device))
        switch.set(tuple(specs))
