r"""The paper's setup: Swin-Base SMART-IQA on KonIQ-10k (SPEC 2), on the official split
(the paper's own 7,046 / 2,010 came from course-provided lists: SPEC 3).

  python -m smartiqa_jax.train --config configs/base.py --workdir workdirs/base \
      --config.data.root=/data/koniq10k --config.model.backbone_weights=/weights/swin_base.safetensors

Every other config imports this one and changes only what differs. Ablations
are keys, not files: `--config.model.fusion=backbone|multiscale|attention`
(the paper's Table II) and `--config.train.loss=l1|l2|plcc|rank|pairwise` (Table V;
also rank_hinge and fidelity, variants of ours).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.variant = 'base'            # nano | tiny | small | base
    config.model.fusion = 'attention'        # attention | multiscale | backbone (Table II)
    # Negative means "the variant's released default" (SPEC 1.5): 0.4 / 0.3 for base.
    # (A config field cannot be None and still accept a float override.)
    config.model.dropout = -1.0
    config.model.drop_path_rate = -1.0
    config.model.attention_dropout = 0.5     # inside the stage-attention MLP (released: 0.5)
    # ImageNet Swin weights for the backbone (a timm checkpoint file); '' trains from scratch.
    config.model.backbone_weights = ''
    # Where scores start: 'model' (the released init) or 'mean_label' (the score
    # bias set to the mean training label; helps training from scratch).
    config.model.score_bias_init = 'model'
    # How the score layers (w5_fc, b5_fc) are scaled: 'model' (released) or
    # 'label_std' (initial weights and their rate times the training labels'
    # std: trains as on z-scored labels, predicts in label units; see
    # optim.make_optimizer). Helps training from scratch with L1/L2.
    config.model.score_scale = 'model'
    # Init of the 1x1 conv stack before the hyper feature: 'model' (released,
    # PyTorch's default) or 'kaiming' (variance-preserving under ReLU; from scratch).
    config.model.hyper_conv_init = 'model'
    # Init of the backbone's Linears when it trains from scratch: 'timm'
    # (trunc-normal 0.02, as released) or 'fan_in' (std 1/sqrt(fan_in); narrow Swins).
    config.model.backbone_init = 'timm'
    # How Swin's window attention is computed (same parameters and results): 'auto'
    # ('pallas' with bfloat16 compute on an NVIDIA GPU from Ampere on, else 'xla'),
    # 'xla' (any device), 'pallas' (fused Triton kernels; GPUs) or 'cudnn' (cuDNN's
    # fused attention; GPUs, bfloat16). The README's model section says what each gains.
    config.model.attention = 'auto'
    config.model.patch_norm = True           # LayerNorm after the patch embedding (demo: off)
    # Fine-tuning: start from a whole trained SMART-IQA model instead of the init above
    # (a model checkpoint, a training workdir, or a released PyTorch .pth/.safetensors).
    # Its variant, fusion and patch_norm replace the ones here; its scores are mapped
    # linearly from its label range onto this run's.
    config.model.init_from = ''

    config.data = ml_collections.ConfigDict()
    config.data.dataset = 'koniq10k'
    config.data.root = '~/data/koniq10k'     # holds koniq10k_distributions_sets.csv and 1024x768/
    config.data.split_seed = 0               # datasets without an official split
    # What the model's scores mean, recorded in its checkpoint; '' and (): the training
    # data's own ('koniq10k MOS_zscore', 0..100 for KonIQ).
    config.data.label_name = ''
    config.data.label_range = ()
    # dataset 'csv': root is a CSV of image paths (relative to images_dir, default the
    # CSV's folder) and scores. split_column values: train|training, validation|val|valid,
    # test|testing; without one, a seeded split (split_seed) by 0.7/0.1/0.2, rows with
    # the same group_column value kept together. score_range: (low, high), default the
    # scores' min and max.
    config.data.csv = ml_collections.ConfigDict()
    config.data.csv.image_column = 'image'
    config.data.csv.score_column = 'score'
    config.data.csv.split_column = ''
    config.data.csv.group_column = ''
    config.data.csv.images_dir = ''
    config.data.csv.score_range = ()
    config.data.csv.higher_is_better = True
    config.data.resize = (512, 384)          # (height, width) before cropping (SPEC 2)
    config.data.crop_size = 224
    config.data.patches_per_image = 20       # each training image appears this often per epoch
    config.data.eval_crops = 20              # crops averaged per image at test time
    config.data.eval_crop_mode = 'random'    # released; seeded per (image, crop): reproducible
    config.data.eval_symmetries = 1          # each crop alone; 2, 4, 8: mirrored/rotated too
    config.data.hflip = True
    config.data.color_jitter = False
    config.data.rotate90 = False             # random 90-degree turns (not in the paper; demo)
    config.data.jpeg_aligned_crops = False   # crops at 2 mod 4: JPEG block edges inside patches
    config.data.cache = False                # decode + resize once into a memory-mapped file
    config.data.num_workers = 0              # grain worker processes
    # Shards of the training stream; -1: one per process. The data order depends
    # on this number only, so a run gives the same model on 1 or several hosts (a
    # resumed run needs the process count it was started with).
    config.data.shard_count = -1
    config.data.max_images_per_split = -1    # > 0: use only this many per split (quick checks)
    # Cross-dataset test sets, 'name=root' comma-separated, e.g. 'spaq=/data/spaq'.
    config.data.cross_datasets = ''

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32             # global, over all devices and hosts
    config.train.eval_batch_size = 64
    config.train.num_epochs = 10
    # Table V as released: l1 | l2 | plcc ("SRCC loss") | rank | pairwise (fidelity);
    # ours: rank_hinge (margin hinge) | fidelity (Thurstone, on the label order).
    config.train.loss = 'l1'
    config.train.loss_params = ml_collections.ConfigDict()
    config.train.loss_params.margin = 1.0    # rank_hinge, label units
    config.train.loss_params.scale = 10.0    # fidelity, label units
    # After training: fit score = a * prediction + b on the training split and fold
    # it into the score layers, so a scale-free loss (plcc, rank_hinge, fidelity)
    # still predicts on the label scale; writes workdir/model (train_params.calibrate_score_layers).
    config.train.calibrate = False
    config.train.patience = 5                # epochs without a better validation SRCC
    config.train.cpu_devices = 0             # > 0: split a CPU into this many data-parallel devices
    # JAX's persistent compilation cache: a rerun or a resumed run loads its compiled
    # programs instead of compiling again ('': off; JAX_COMPILATION_CACHE_DIR wins).
    config.train.compilation_cache_dir = '~/.cache/smartiqa_jax/xla_cache'
    config.train.compute_dtype = 'float32'   # bfloat16 on GPU/TPU; parameters stay float32
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 500
    config.train.keep_checkpoints = 2        # latest N, plus the best by validation SRCC
    config.train.progress_bar = True
    config.train.max_steps_per_epoch = -1    # > 0 truncates epochs (quick experiments)

    config.optim = ml_collections.ConfigDict()
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip_norm = 1.0
    config.optim.warmup_epochs = 0.0
    config.optim.schedule_unit = 'epoch'     # epoch (released: per-epoch cosine) | step
    config.optim.backbone = ml_collections.ConfigDict()
    config.optim.backbone.lr = 5e-7
    # Released eta_min 1e-6 is above the backbone's start: its rate rises (SPEC 2).
    config.optim.backbone.min_lr = 1e-6
    config.optim.backbone.weight_decay = 2e-4
    config.optim.head = ml_collections.ConfigDict()
    config.optim.head.lr = 5e-6
    config.optim.head.min_lr = 1e-6
    config.optim.head.weight_decay = 2e-4
    return config
