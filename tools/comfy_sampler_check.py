"""ComfyUI's own samplers driving the rank pool, checked against a real ComfyUI (not CI: ComfyUI is not
on PyPI). Run with ComfyUI's python and this pack importable as `mochi_xdit`:

    mkdir -p /tmp/pkgs && ln -sfn "$PWD" /tmp/pkgs/mochi_xdit     # a `mochi_xdit` link to this folder
    PYTHONPATH=/tmp/pkgs /tmp/comfy/venv/bin/python tools/comfy_sampler_check.py [--quick] [--comfy DIR]

The oracle is core itself: ComfyUI's own Mochi model (`comfy.ldm.genmo...AsymmDiTJoint`, inside
`comfy.model_base.GenmoMochi`, built by `comfy.supported_models.GenmoMochi.get_model` from a unet
config that is core's fixed Mochi config (`comfy/model_detection.py`) at the demo DiT's sizes),
loaded with the demo DiT's weights (genmo key names, strict), sampled by core KSampler
(`nodes.common_ksampler`). ComfyUI's joint block asserts the full-size MLP width
(`assert mlp_hidden_dim_x == int(1536 * 8)`), the only thing that stops a small core Mochi: the
script runs under `python -O` (asserts off; it re-executes itself so when started without), and
the strict weight load then proves every shape equal to the demo DiT's. Our side: `mochi_xdit.nodes.comfy_sampling.sample_latent` on a 2-rank
CPU pool (Ulysses 2) holding the same weights. Same conditioning, latent, seed, sampler, scheduler.

(a) every name in comfy.samplers.KSampler.SAMPLERS x SWEEP_SCHEDULERS, and every scheduler with
    euler, `--steps` steps: failures (ours only, or core too) and max / mean |ours - core|;
(b) KSampler's LATENT contract: denoise < 1 on a non-empty latent, batch_index, noise_mask, cfg 1;
(c) euler + linear_quadratic / simple through ComfyUI's sampler equals the pool's on-rank loop;
(d) SamplerCustomAdvanced with MochiXDiTGuider (+ MochiXDiTModelSampling for BasicScheduler),
    RandomNoise and KSamplerSelect, against SamplerCustomAdvanced with core's CFGGuider;
(e) Cancel (ComfyUI's interrupt flag) between evaluations, then the pool still samples.
Exit status 1 when anything fails or disagrees beyond the tolerance.
"""

import argparse
import os
import sys
import tempfile
import time
import traceback

import torch

SWEEP_SCHEDULERS = ("simple", "linear_quadratic", "karras", "beta")
RELATIVE_TOLERANCE = 1e-4  # |ours - core|max / |core|max, fp32 (differences are ~1e-6 per forward)
LATENT_SHAPE = (1, 12, 2, 8, 12)  # 7 frames of 96x64 pixels


def import_comfy(comfy_dir: str):
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars for hundreds of short runs


def conditioning(valid_tokens: int, seed: int) -> list:
    """CLIPTextEncode's Mochi CONDITIONING: [[cond [1, 256, 4096], {attention_mask [1, 256] int64}]]."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 256, 4096, generator=generator)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[:, :valid_tokens] = 1
    return [[features, {"pooled_output": None, "attention_mask": mask}]]


def core_tiny_mochi(dit_path: str):
    """ComfyUI's own Mochi model at the demo DiT's size, holding its weights, in a ModelPatcher."""
    import comfy.model_patcher
    import comfy.supported_models
    from safetensors.torch import load_file

    from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG as c

    unet_config = {  # comfy/model_detection.py's Mochi config, sizes from the demo DiT
        "image_model": "mochi_preview", "depth": c.depth, "patch_size": 2, "num_heads": c.num_heads,
        "hidden_size_x": c.hidden_size_x, "hidden_size_y": c.hidden_size_y, "mlp_ratio_x": 4.0, "mlp_ratio_y": 4.0,
        "learn_sigma": False, "in_channels": 12, "qk_norm": True, "qkv_bias": False, "out_bias": True,
        "attn_drop": 0.0, "patch_embed_bias": True, "posenc_preserve_area": True, "timestep_mlp_bias": True,
        "attend_to_padding": False, "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": c.t5_feat_dim,
        "t5_token_length": 256, "rope_theta": 10000.0,
    }
    config = comfy.supported_models.GenmoMochi(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    state = load_file(dit_path)
    model.diffusion_model.load_state_dict(state, strict=True)  # same key names, same shapes, or this raises
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class Report:
    def __init__(self):
        self.failed = []

    def compare(self, label: str, ours, core, tolerance: float = RELATIVE_TOLERANCE) -> None:
        diff = (ours.float() - core.float()).abs()
        scale = max(core.float().abs().max().item(), 1e-12)
        ok = bool(torch.isfinite(ours).all()) and diff.max().item() <= tolerance * scale
        print(f"  {'ok  ' if ok else 'FAIL'} {label:<46} max |d| {diff.max().item():.2e}  mean |d| "
              f"{diff.mean().item():.2e}  (|core| max {scale:.2f})", flush=True)
        if not ok:
            self.failed.append(label)

    def error(self, label: str, error: BaseException) -> None:
        print(f"  FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
        self.failed.append(label)


def main():
    if not sys.flags.optimize:  # see the module docstring: core's full-width assert
        print("re-running under python -O (ComfyUI's Mochi block asserts the full-size MLP width)", flush=True)
        os.execv(sys.executable, [sys.executable, "-O", *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy", default=os.environ.get("COMFY_DIR", "/tmp/comfy/ComfyUI"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="a few samplers only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import_comfy(args.comfy)

    import comfy.samplers
    import nodes as comfy_nodes  # ComfyUI's nodes.py (KSampler's common_ksampler)
    from comfy_extras import nodes_custom_sampler as custom

    from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, demo_checkpoints
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.mochi.sampler import SampleRequest
    from mochi_xdit.nodes.comfy_sampling import sample_latent
    from mochi_xdit.nodes.comfy_types import conditioning_to_text
    from mochi_xdit.nodes.guider import MochiXDiTGuider
    from mochi_xdit.nodes.model_sampling import MochiXDiTModelSampling
    from mochi_xdit.nodes.handle import PoolHandle, pool_for
    from mochi_xdit.workers.protocol import PoolSpec
    from mochi_xdit.workers.service import default_service

    dit_path, _ = demo_checkpoints(tempfile.mkdtemp(prefix="mochi_xdit_check_"))
    core_model = core_tiny_mochi(str(dit_path))
    spec = PoolSpec(str(dit_path), None, "fp32", ParallelConfig(2, 1, 2, 1, num_heads=DEMO_DIT_CONFIG.num_heads),
                    device="cpu", cpu_threads=1)
    handle = PoolHandle(spec)
    positive, negative = conditioning(9, 1), conditioning(1, 2)  # an empty prompt still has its EOS token
    pos_text, neg_text = conditioning_to_text(positive, "positive"), conditioning_to_text(negative, "negative")
    report = Report()

    def ours(latent, sampler, scheduler, cfg=4.5, denoise=1.0, steps=args.steps):
        return sample_latent(handle, pos_text, neg_text, latent, seed=args.seed, steps=steps, cfg=cfg,
                             sampler_name=sampler, scheduler=scheduler, denoise=denoise)

    def core(latent, sampler, scheduler, cfg=4.5, denoise=1.0, steps=args.steps):
        return comfy_nodes.common_ksampler(core_model, args.seed, steps, cfg, sampler, scheduler, positive, negative,
                                           latent, denoise=denoise)[0]["samples"]

    try:
        start = time.perf_counter()
        pool_for(handle)
        print(f"pool: 2 CPU ranks (ulysses 2), demo DiT, started in {time.perf_counter() - start:.1f} s")
        empty = {"samples": torch.zeros(LATENT_SHAPE)}

        samplers = comfy.samplers.KSampler.SAMPLERS
        if args.quick:
            samplers = ["euler", "euler_ancestral", "dpmpp_2m_sde", "euler_cfg_pp", "uni_pc", "dpm_2"]
        combos = [(s, sch) for s in samplers for sch in SWEEP_SCHEDULERS]
        combos += [("euler", sch) for sch in comfy.samplers.KSampler.SCHEDULERS if sch not in SWEEP_SCHEDULERS]
        print(f"(a) {len(combos)} sampler x scheduler runs, {args.steps} steps, cfg 4.5, seed {args.seed}, latent "
              f"{LATENT_SHAPE}; ours vs core KSampler with ComfyUI's own Mochi model:")
        worst, start = 0.0, time.perf_counter()
        for sampler, scheduler in combos:
            label = f"{sampler} / {scheduler}"
            try:
                reference = core(empty, sampler, scheduler)
            except Exception as error:  # core itself cannot run it: ours must fail too, or is not compared
                reference = error
            try:
                result = ours(empty, sampler, scheduler)
            except Exception as error:
                if isinstance(reference, Exception):
                    print(f"  skip {label}: core fails too ({type(reference).__name__}: {reference})")
                else:
                    report.error(label, error)
                    traceback.print_exc()
                continue
            if isinstance(reference, Exception):
                print(f"  note {label}: ours ran, core failed ({type(reference).__name__}: {reference})")
                continue
            report.compare(label, result, reference)
            worst = max(worst, ((result - reference).abs().max() / reference.abs().max()).item())
        print(f"  worst relative difference {worst:.2e}; {time.perf_counter() - start:.0f} s for (a)")

        print("(b) KSampler's LATENT contract, ours vs core:")
        generator = torch.Generator().manual_seed(3)
        source = {"samples": torch.randn(LATENT_SHAPE, generator=generator)}
        batch = {"samples": torch.zeros((2, *LATENT_SHAPE[1:])), "batch_index": [3, 5]}
        mask = torch.zeros(1, 1, 8 * LATENT_SHAPE[3], 8 * LATENT_SHAPE[4])
        mask[..., : mask.shape[-1] // 2] = 1.0  # inpaint the left half
        masked = {"samples": torch.randn(LATENT_SHAPE, generator=generator), "noise_mask": mask}
        for label, latent, kwargs in (
            ("denoise 0.6, non-empty latent, euler/simple", source, {"denoise": 0.6}),
            ("denoise 0.6, non-empty latent, dpmpp_2m_sde/karras", source,
             {"denoise": 0.6, "sampler": "dpmpp_2m_sde", "scheduler": "karras"}),
            ("batch 2, batch_index [3, 5], euler_ancestral", batch, {"sampler": "euler_ancestral"}),
            ("noise_mask (left half), euler/simple", masked, {}),
            ("noise_mask, denoise 0.8, dpmpp_2m/beta", masked,
             {"denoise": 0.8, "sampler": "dpmpp_2m", "scheduler": "beta"}),
            ("cfg 1, euler/simple", empty, {"cfg": 1.0}),
            ("cfg 1, euler_cfg_pp/simple (needs uncond x0)", empty, {"cfg": 1.0, "sampler": "euler_cfg_pp"}),
        ):
            options = {"sampler": "euler", "scheduler": "simple", **kwargs}
            try:
                report.compare(label, ours(latent, **options), core(latent, **options))
            except Exception as error:
                report.error(label, error)
                traceback.print_exc()
        batch_out = ours(batch, "euler", "simple")
        single = ours({"samples": torch.zeros(LATENT_SHAPE), "batch_index": [5]}, "euler", "simple")
        report.compare("batch_index [3, 5]: sample 1 == a lone index 5", batch_out[1:], single, 1e-5)

        print("(c) euler through ComfyUI's sampler vs the pool's on-rank loop (and core):")
        pool = pool_for(handle)
        for schedule in ("linear_quadratic", "simple"):
            for cfg in (1.0, 4.5):
                request = SampleRequest(pos_text, neg_text, latent_shape=LATENT_SHAPE, seed=args.seed, steps=6,
                                        cfg=cfg, schedule=schedule)
                on_rank = pool.sample(request)
                driven = ours(empty, "euler", schedule, cfg=cfg, steps=6)
                report.compare(f"on-rank {schedule} cfg {cfg} vs ComfyUI euler", driven, on_rank, 1e-5)
                report.compare(f"on-rank {schedule} cfg {cfg} vs core KSampler", on_rank,
                               core(empty, "euler", schedule, cfg=cfg, steps=6))

        print("(d) SamplerCustomAdvanced: MochiXDiTGuider vs core CFGGuider:")
        model_sampling = MochiXDiTModelSampling().get_model()[0]
        guider = MochiXDiTGuider().get_guider(handle, positive, negative, 4.5)[0]
        core_guider = custom.CFGGuider().get_guider(core_model, positive, negative, 4.5)[0]
        noise = custom.RandomNoise().get_noise(args.seed)[0]
        for sampler_name, scheduler in (("euler", "simple"), ("dpmpp_2m_sde", "beta"), ("res_multistep_cfg_pp", "karras")):
            sampler = custom.KSamplerSelect().get_sampler(sampler_name)[0]
            sigmas = custom.BasicScheduler().get_sigmas(model_sampling, scheduler, args.steps, 1.0)[0]
            core_sigmas = custom.BasicScheduler().get_sigmas(core_model, scheduler, args.steps, 1.0)[0]
            if not torch.equal(sigmas, core_sigmas):
                report.error(f"BasicScheduler {scheduler}", ValueError(f"sigmas {sigmas} != core's {core_sigmas}"))
            high, low = custom.SplitSigmas().get_sigmas(sigmas, 1)
            try:
                out = custom.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, empty)[0]["samples"]
                ref = custom.SamplerCustomAdvanced().sample(noise, core_guider, sampler, sigmas, empty)[0]["samples"]
                report.compare(f"{sampler_name} / BasicScheduler {scheduler}", out, ref)
                # two SamplerCustomAdvanced nodes on SplitSigmas halves, the second without new noise
                part = custom.SamplerCustomAdvanced().sample(noise, guider, sampler, high, empty)[0]
                no_noise = custom.DisableNoise().get_noise()[0]
                out2 = custom.SamplerCustomAdvanced().sample(no_noise, guider, sampler, low, part)[0]["samples"]
                part = custom.SamplerCustomAdvanced().sample(noise, core_guider, sampler, high, empty)[0]
                ref2 = custom.SamplerCustomAdvanced().sample(no_noise, core_guider, sampler, low, part)[0]["samples"]
                report.compare(f"{sampler_name} / SplitSigmas(1) then DisableNoise", out2, ref2)
            except Exception as error:
                report.error(f"SamplerCustomAdvanced {sampler_name}", error)
                traceback.print_exc()

        print("(e) Cancel mid-run (ComfyUI's interrupt flag), then the pool still samples:")
        import comfy.model_management as management

        def cancel_after_first_step(step, x0, x, total_steps):
            if step == 0:
                management.interrupt_current_processing(True)

        try:
            sample_latent(handle, pos_text, neg_text, empty, seed=args.seed, steps=args.steps, cfg=4.5,
                          sampler_name="heun", scheduler="simple", denoise=1.0, callback=cancel_after_first_step)
            report.error("cancel", RuntimeError("the run was not interrupted"))
        except management.InterruptProcessingException:
            print("  ok   InterruptProcessingException raised at the next evaluation", flush=True)
        report.compare("after the cancel: euler / simple", ours(empty, "euler", "simple"),
                       core(empty, "euler", "simple"))
    finally:
        default_service().shutdown()
    if report.failed:
        print(f"FAILED ({len(report.failed)}): {', '.join(report.failed)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
