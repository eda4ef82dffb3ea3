r"""SMART-IQA trained from scratch on the built-in demo dataset, on a CPU.

  python -m smartiqa_jax.train --config configs/demo.py

No download: the demo images are made on first use from scikit-image's sample
photos with synthetic distortions (smartiqa_jax.data.demo), split by source
photo, so the test photos are never seen in training. With no pretrained
weights the backbone trains at the head's rate, with warmup and a per-step
cosine.

What it reaches (2026-11-26, shared 2-core CPU): test SRCC 0.31, PLCC 0.34
(best validation SRCC 0.33, epoch 8 of 10) in 545 s with the dataset cached;
the same numbers (the run is deterministic) in 783 s from a fresh dataset
while other jobs loaded the CPU. The goal, test SRCC >= 0.80 in 10
minutes, is not reached: the from-scratch Swin learns
distortion features too slowly, and the 9 training photos are too few for
what it does learn to transfer.

Why these settings (screening runs of 3-8 epochs on the same day; small
validation and test sets of 3 photos each, so differences of ~0.1 are noise):
- 'pico' (a 16-wide Swin, one block per stage): 2-3x nano's images per
  second, so 1160 steps of 16 fit where nano made 348 of 32.
- score_scale='label_std' (trains as on z-scored labels; checkpoints still
  predict 0..100) and hyper_conv_init='kaiming' (the hyper feature is then
  not ~15x smaller than the fused features): with them L1 leaves the
  constant prediction, slowly (nano, 3 epochs: validation SRCC 0.21 with
  label_std alone at rate 5e-4, 0.34 with both at 1e-3; 2e-3: 0.14).
- Not used: backbone_init='fan_in' makes the training loss fall fast (L2
  RMSE 23 -> 17 in 8 epochs) but validation does not follow (best 0.31,
  test 0.04; the ranking hinge likewise): it fits the training photos.
- Not used either: more training content. 60 procedurally made "dead
  leaves" images (occluding discs with a natural-image-like size law) with
  the same 31 versions each, added to the training photos: pico, 3 epochs
  (870 steps) reached validation 0.36, test 0.31, about what the photos alone
  give. A small CNN on 96-pixel crops (1500 steps) gained more from them
  (validation 0.38 -> 0.64, test 0.43 -> 0.51): content helps a model that
  fits, and the from-scratch Swin does not fit yet. With backbone_init='fan_in'
  as well (it fits faster) the same run fell to validation 0.19, test 0.21:
  it fits the synthetic content instead.
Per distortion (pico, L1, 6 epochs, test): colour 0.73, blur 0.44, contrast
0.37, downsample 0.25, JPEG 0.00, noise -0.42 (noise is read as detail).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.variant = 'pico'
    config.model.fusion = 'attention'
    config.model.score_bias_init = 'mean_label'
    config.model.score_scale = 'label_std'
    config.model.hyper_conv_init = 'kaiming'
    config.model.dropout = 0.0               # a 10-minute run underfits; nothing to regularise

    config.data.dataset = 'demo'
    config.data.root = '~/.cache/smartiqa_jax/demo'
    config.data.label_name = 'demo pseudo-MOS'
    config.data.resize = ()                  # keep the 240x320 demo images
    config.data.patches_per_image = 4
    config.data.eval_crops = 4
    config.data.cache = True

    config.train.batch_size = 16
    config.train.loss = 'l1'
    config.train.eval_batch_size = 32
    config.train.num_epochs = 10
    config.train.patience = 0                # off: the short cosine run ends at its best
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = 100

    config.optim.warmup_epochs = 0.5
    config.optim.schedule_unit = 'step'
    config.optim.backbone.lr = 1e-3
    config.optim.backbone.min_lr = 1e-5
    config.optim.backbone.weight_decay = 0.05
    config.optim.head.lr = 1e-3
    config.optim.head.min_lr = 1e-5
    config.optim.head.weight_decay = 0.05
    return config
