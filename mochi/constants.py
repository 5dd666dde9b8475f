"""Mochi-1 constants, named once. Values from genmo's Mochi code and ComfyUI's latent format."""

LATENT_CHANNELS = 12
SPATIAL_COMPRESSION = 8  # VAE: 8x in height and width
TEMPORAL_COMPRESSION = 6  # VAE: T latent frames -> 6T - 5 video frames
PATCH_SIZE = 2  # DiT: 2x2 patches on the latent grid
SIZE_MULTIPLE = SPATIAL_COMPRESSION * PATCH_SIZE  # width and height must be multiples of 16
NUM_HEADS = 24  # full-size DiT
TEXT_TOKENS = 256  # T5 context the model was trained with
T5_DIM = 4096
ROPE_TARGET_AREA = 36864  # RoPE positions are scaled to this patch-grid area (192 x 192)
TIMESTEP_SCALE = 1000.0
TIMESTEP_FREQ_DIM = 256
SCHEDULE_NAMES = ("linear_quadratic", "simple")  # genmo's schedule, ComfyUI's flow schedule (shift 6)
# genmo's sampling settings for Mochi-1 (every front door's default, workers/option_table.py)
DEFAULT_STEPS = 64
DEFAULT_CFG = 4.5
# Step caching: TeaCache's published Mochi threshold (~1.5x; 0.09: ~2.1x; 848x480x163, 64 steps, one
# A800), also ParaAttention's first-block default for Mochi.
DEFAULT_CACHE_THRESHOLD = 0.06
WEIGHT_DTYPE_NAMES = ("bf16", "fp16", "fp32", "fp8")  # DiT weights; fp8: Linear weights only, per-tensor scale

# Per-channel statistics of the VAE latent space (ComfyUI latent_formats.Mochi, genmo vae stats).
# model space = (vae - mean) / std; VAE space = model * std + mean.
LATENT_MEAN = (
    -0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
    0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
    -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285,
)
LATENT_STD = (
    0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
    0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
    0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041,
)

