"""Shared configuration defaults and validation.

Every file in `configs/` starts from `base_config()` and changes what differs.
The defaults are the reference's hyper-parameters (docs/method.md §4-12) for
GTA5 -> Cityscapes at 512x512 crops; `validate` turns a bad combination into a
one-line `ValueError` before anything is compiled.
"""

from __future__ import annotations

import ml_collections

from wsda_jax import config_model, config_ranges, config_schema

# How prepared records may store images (`data.records` encodes and decodes them).
IMAGE_FORMATS = ("npy", "png")

WEAK_LABEL_KINDS = ("none", "image", "point", "coarse")
# The kinds whose weak label is a label map of pixels (the others: a presence vector, or none).
LABEL_MAP_KINDS = ("point", "coarse")
STAGES = ("source_only", "adapt", "oracle")
PRESENCE_SOURCES = ("crop", "image")
TEACHER_INITS = ("ema", "student")
BOUNDARY_MAX = ("device", "global")
OPTIMIZERS = ("sgd", "adamw")  # `optim.make_optimizer`
COMPUTE_DTYPES = ("float32", "bfloat16")  # config.compute_dtype


def has_label_map(weak_label: str) -> bool:
    """Whether the weak-label kind labels pixels ('point', 'coarse'): its map then overwrites
    the pseudo labels, trains `seg_u` and centres the target prototypes (docs/method.md §4)."""
    return weak_label in LABEL_MAP_KINDS


def base_config() -> ml_collections.ConfigDict:
    """Returns the reference's hyper-parameters; configs override what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_classes = 19
    # 'source_only': stage 1 on source labels; 'adapt': stage 2 (the method);
    # 'oracle': supervised training on the target's fine labels.
    c.stage = "adapt"
    # Target weak label: 'none' (plain UDA), 'image', 'point' or 'coarse'.
    c.weak_label = "coarse"
    # Presence vector of the image-level losses: 'crop' = the classes of the augmented
    # crop of the weak label map (gtCoarse for coarse/image, points for point), the
    # faithful default; 'image' = the whole image's fine-label classes (true image tags).
    c.presence = "crop"
    c.num_steps = 150_000
    # Per device, per domain, as the reference's bs_trn: 4 source + 4 target images on
    # every device; the global batch is this times the number of devices.
    c.per_device_batch_size = 4
    c.compute_dtype = "float32"  # or 'bfloat16' (parameters and losses stay float32).

    c.model = ml_collections.ConfigDict()
    # 'deeplabv2' (the reference: ResNet, output stride 8) or 'daformer' (MiT encoder and
    # DAFormer decoder, output stride 4; docs/method.md §3). Keys below apply to one arch.
    c.model.arch = "deeplabv2"
    c.model.depth = 101
    c.model.width = 64  # Channels of the stem; torchvision ResNets use 64.
    c.model.proj_dim = 256
    c.model.aspp_dilations = (12, 24, 36, 48)
    c.model.stage_sizes = ()  # Blocks per stage; () = the depth's standard (3, 4, 23, 3) etc.
    # Backbone rematerialisation: 'none', 'blocks' (recompute each residual block in the
    # backward pass) or 'conv_outputs' (keep conv outputs, recompute BatchNorm and ReLU).
    # Peak memory and speed of each: docs/accelerators.md, docs/aot.md.
    c.model.remat = "none"
    # DAFormer: MiT variant 'b0'..'b5'; () = the variant's widths / blocks per stage.
    c.model.mit = "b5"
    c.model.mit_embed_dims = ()
    c.model.mit_depths = ()
    c.model.drop_path_rate = 0.1  # Stochastic depth of the MiT blocks (DAFormer's 0.1).
    # Each MiT stage runs its blocks as one loop; True unrolls them into straight-line code
    # (the same model; XLA compiles MiT-B5 many times slower). aot.cpu_cost sets it: XLA's
    # cost analysis counts a loop's body once.
    c.model.mit_unroll = False
    c.model.decoder_dim = 256  # Channels of the DAFormer decoder's embeddings and fusion.

    c.init = ml_collections.ConfigDict()
    # ImageNet weights of the backbone (.pth or .npz), stage 1: a torchvision ResNet, or
    # for the daformer arch an NVlabs SegFormer mit_b*.pth.
    c.init.imagenet = ""
    c.init.init_from = ""  # Stage-1 checkpoint directory (student and teacher), stage 2.
    # Stage-2 teacher: 'ema' = the stage-1 checkpoint's EMA teacher (the reference),
    # 'student' = a copy of the stage-1 student.
    c.init.teacher = "ema"
    # A one-stage adaptation (DAFormer's recipe, the `:daformer` configs): stage 'adapt'
    # from ImageNet weights (init.imagenet; from scratch on the synthetic data), never
    # from a stage-1 checkpoint (init.init_from is refused).
    c.init.one_stage = False

    c.data = ml_collections.ConfigDict()
    c.data.source = "gta5"
    c.data.target = "cityscapes_weak"
    c.data.data_dir = "~/tensorflow_datasets"  # Where prepared datasets live.
    c.data.manual_dir = ""  # Raw download, used only to prepare.
    c.data.source_manual_dir = ""  # Raw source download when it differs from manual_dir.
    # Fixed resize at preparation, before the random scale and crop (docs/method.md §12):
    # GTA5 to 1280x720, Cityscapes train to 1024x512 (val stays 2048x1024); SYNTHIA
    # and the embedded datasets are not resized. Part of the prepared dataset's name.
    c.data.pre_resize = True
    c.data.crop_size = (512, 512)  # (height, width)
    c.data.scale_range = (0.5, 2.0)
    c.data.flip = True
    # How prepared records store images: 'npy' (raw arrays, no decoding: ~3x the images
    # per host core of 'png', at ~1.8x the disk of PNG photos) or 'png' (compact). Part
    # of the prepared dataset's name (docs/benchmarks.md, "Input pipeline").
    c.data.image_format = "npy"
    c.data.jitter = 0.25  # Colour jitter strength, applied in the train step.
    # grain worker processes per host; -1 = chosen from the host's cores and local
    # devices (`pipeline.num_workers`), 0 = decode in the training process.
    c.data.num_workers = -1
    c.data.prefetch_buffer_size = 2
    c.data.points_per_class = 1
    c.data.eval_resize = ()  # (height, width) to resize val images, () = full size.
    # The embedded procedural dataset (data.source='synthetic_source',
    # data.target='synthetic_target'), generated on first use.
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.height = 128
    c.data.synthetic.width = 256
    c.data.synthetic.num_source = 2000
    c.data.synthetic.num_target_train = 1000
    c.data.synthetic.num_target_val = 200
    c.data.synthetic.seed = 0
    # Synthesised coarse labels: 'eroded' or 'every_class' (thin classes kept,
    # docs/synthetic_results.md "Coarse labels that keep thin classes").
    c.data.synthetic.coarse = "eroded"
    # Rare class sampling (DAFormer, Hoyer et al., CVPR 2022), not in the reference: a
    # source class c drawn with probability softmax((1 - f_c) / temperature) of the
    # source's pixel frequencies f, then uniformly one source image with more than
    # min_pixels pixels of c (`data/rare_class_sampling.py`, docs/beyond_reference.md).
    c.data.rare_class_sampling = ml_collections.ConfigDict()
    c.data.rare_class_sampling.enabled = False
    c.data.rare_class_sampling.temperature = 0.01
    # Pixels at the prepared resolution: DAFormer's 3000 of GTA5's 1914x1052 label maps,
    # scaled by area to the 1280x720 prepared images.
    c.data.rare_class_sampling.min_pixels = 1373
    # The crop of a drawn image is re-drawn (up to 10 times) until it holds more than
    # min_crop_pixels pixels of the class; 0 = no re-draw. DAFormer's bound, min_pixels *
    # min_crop_ratio = 3000 * 0.5, counted in the crop of its 1280x720 training image (the
    # prepared resolution here), where its 3000-px image filter counts the 1914x1052 label.
    c.data.rare_class_sampling.min_crop_pixels = 1500

    c.loss = ml_collections.ConfigDict()
    c.loss.seg_mix = 1.0
    c.loss.seg_s = 1.0
    c.loss.seg_u = 1.0
    c.loss.edge_s = 10.0
    c.loss.inter = 0.5
    c.loss.intra_tgt = 0.25
    c.loss.intra_src = 0.25
    c.loss.im_u = 1.0
    c.loss.im_proto = 1.0
    c.loss.contrast_start = 10_000  # Steps before the contrastive and image losses switch on.
    # 0: the contrastive terms switch on at full weight (the reference); R > 0: their
    # weight ramps linearly from 0 to 1 over R steps from contrast_start (a study option).
    c.loss.contrast_ramp_steps = 0
    c.loss.use_contrast = True
    # Stage 1 only: also train on intra_src (weight loss.intra_src) from step 0, so the
    # projection head is trained before stage 2. Off in the reference (a study option).
    c.loss.source_only_contrast = False
    c.loss.temperature = 0.1
    c.loss.base_temperature = 0.07
    c.loss.max_views = 20
    c.loss.inter_max_samples = 512
    c.loss.intra_max_samples = 256
    c.loss.inter_easy_threshold = 0.95
    c.loss.intra_easy_threshold = 0.96
    c.loss.boundary_tau = 0.5
    # Normaliser of the boundary loss's gradient magnitudes: 'device' = the maximum over
    # this device's batch (the reference's DDP), 'global' = over all devices.
    c.loss.boundary_max = "device"
    c.loss.mic = 1.0  # Weight of the masked image consistency term (with config.mic).
    # Thing-class ImageNet feature distance (DAFormer, not in the reference; stage 'adapt'):
    # weight of the `imnet_fd` term (DAFormer's 0.005; 0 = off), the train ids it is
    # computed on and the share of a feature cell a label must cover
    # (`feature_distance.py`, docs/daformer.md). Needs init.imagenet for its frozen copy.
    c.loss.imnet_fd = 0.0
    c.loss.imnet_fd_classes = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    c.loss.imnet_fd_min_ratio = 0.75

    # Masked image consistency (MIC, Hoyer et al., CVPR 2023), not in the reference: the
    # student also learns the teacher's pseudo labels on the strongly augmented target
    # image with random blocks masked (`masking.py`, docs/beyond_reference.md).
    c.mic = ml_collections.ConfigDict()
    c.mic.enabled = False
    # Pixels: MIC's 32 at 512x512 crops of half-resolution images (MIC's 64 is for its
    # full-resolution 1024x1024 crops; docs/beyond_reference.md "Block size").
    c.mic.block_size = 32
    c.mic.mask_ratio = 0.7  # Fraction of blocks masked.

    c.pseudo = ml_collections.ConfigDict()
    c.pseudo.threshold = 0.968  # Confidence for the ClassMix pixel weight.
    c.pseudo.proto_threshold = 0.95  # Confidence for prototype members / inter labels.
    c.pseudo.ignore_top = 15
    c.pseudo.ignore_bottom = 120
    c.pseudo.filter_by_presence = False  # Improvement for 'image': drop absent classes.

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.999
    c.ema.ramp = False  # a = min(1 - 1/(step+1), decay), the reference's other mode.
    # The teacher's train-mode forward updates its BatchNorm running statistics (the
    # reference); False discards that update.
    c.ema.teacher_bn_update = True

    c.classmix = ml_collections.ConfigDict()
    c.classmix.enabled = True
    c.classmix.per_image = False  # Faithful default: classes drawn from the whole batch.
    c.classmix.jitter_prob = 0.8
    c.classmix.jitter_strength = 0.25
    c.classmix.blur_prob = 0.5
    c.classmix.blur_sigma = (0.15, 1.15)
    # Jitter / blur decided once per step for the device's batch (faithful) or per image.
    c.classmix.per_image_augment = False

    c.optim = ml_collections.ConfigDict()
    # 'sgd': the reference's SGD and warm-up/poly schedule (docs/method.md §11); 'adamw':
    # DAFormer's AdamW with mmcv's poly schedule and warm-up (docs/daformer.md).
    c.optim.name = "sgd"
    c.optim.lr = 2.5e-3
    c.optim.head_lr_mult = 10.0
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 1500
    c.optim.power = 0.9
    c.optim.betas = (0.9, 0.999)  # 'adamw' only.
    # 'adamw' only: mmcv's linear warm-up starts at warmup_ratio times the decayed rate.
    c.optim.warmup_ratio = 1e-6

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 5000
    c.eval.per_device_batch_size = 8  # As the reference's bs_val.
    # Images per model forward within a device's eval batch (0 = all at once): at
    # 2048x1024 the full-resolution logits of 8 images take 1.3 GB; the result is the same.
    c.eval.images_per_forward = 1
    c.eval.scales = (1.0,)
    c.eval.flip = False
    c.eval.num_panels = 4
    c.eval.max_images = 0  # 0 = the whole split.

    # A jax.profiler trace of num_steps steps after start_step into WORKDIR/tensorboard; 0 = off.
    c.profile = ml_collections.ConfigDict({"start_step": 0, "num_steps": 3})
    c.log_every_steps = 50
    c.checkpoint_every_steps = 2000
    c.keep_checkpoints = 3
    return c


def validate_values(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError naming the first key whose value has the wrong type
    (`config_schema`) or is out of range (`config_ranges`); needs no devices or data, so
    every mode (`--mode=compile` too) runs it before any work."""
    config_schema.validate_types(config, base_config())
    config_ranges.validate_ranges(config)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises a one-line ValueError for a configuration that cannot run on `num_devices`.

    Batch sizes are per device (the reference's bs_trn / bs_val), so every positive
    size runs on any number of devices and hosts; the global batch is the per-device
    size times `num_devices` (`global_batch_size`).
    """
    validate_values(config)
    if config.weak_label not in WEAK_LABEL_KINDS:
        raise ValueError(
            f"config.weak_label={config.weak_label!r}: expected one of {WEAK_LABEL_KINDS}"
        )
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r}: expected one of {STAGES}")
    config_model.validate_model(config)
    if num_devices < 1:
        raise ValueError(f"no devices to run on (num_devices={num_devices})")
    for key in ("per_device_batch_size", "eval.per_device_batch_size"):
        value = config[key] if "." not in key else config.eval[key.split(".")[1]]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.{key}={value!r}: must be an integer >= 1 (images per device)")
    per_forward, eval_batch = config.eval.images_per_forward, config.eval.per_device_batch_size
    if per_forward < 0 or (per_forward and eval_batch % per_forward):
        raise ValueError(
            f"config.eval.images_per_forward={per_forward}: must be 0 (all) or divide "
            f"config.eval.per_device_batch_size={eval_batch}"
        )
    for key, allowed in (
        ("presence", PRESENCE_SOURCES),
        ("init.teacher", TEACHER_INITS),
        ("loss.boundary_max", BOUNDARY_MAX),
        ("data.image_format", IMAGE_FORMATS),
        ("optim.name", OPTIMIZERS),
    ):
        value = config
        for part in key.split("."):
            value = value[part]
        if value not in allowed:
            raise ValueError(f"config.{key}={value!r}: expected one of {allowed}")
    if config.loss.imnet_fd > 0 and config.stage != "adapt":
        raise ValueError(f"config.loss.imnet_fd={config.loss.imnet_fd}: only in stage 'adapt'")
    bad = [c for c in config.loss.imnet_fd_classes if not 0 <= c < config.num_classes]
    if bad:
        raise ValueError(f"config.loss.imnet_fd_classes: {bad} are not train ids")
    if config.init.one_stage and (config.stage != "adapt" or config.init.init_from):
        raise ValueError(
            "config.init.one_stage: a one-stage run adapts (stage 'adapt') from ImageNet "
            f"weights or scratch, not from config.init.init_from={config.init.init_from!r}"
        )
    if config.loss.contrast_start < 0:
        raise ValueError(f"config.loss.contrast_start={config.loss.contrast_start} must be >= 0")
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype={config.compute_dtype!r}: float32 or bfloat16")


def global_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Training images per domain and step over all devices."""
    return config.per_device_batch_size * num_devices


def batch_summary(config: ml_collections.ConfigDict, num_devices: int) -> str:
    """One line for the start-up log: per-device and global train and eval batches."""
    per_device, eval_per_device = config.per_device_batch_size, config.eval.per_device_batch_size
    domains = "source + target" if config.stage == "adapt" else "source"
    return (
        f"Batch: {per_device} {domains} image(s) per device x {num_devices} device(s) = "
        f"{global_batch_size(config, num_devices)} per domain and step; evaluation "
        f"{eval_per_device} per device = {eval_per_device * num_devices} per batch."
    )
