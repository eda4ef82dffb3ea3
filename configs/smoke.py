r"""A few seconds of the real trainer: nano model, a handful of demo images.

  python -m smartiqa_jax.train --config configs/smoke.py --workdir /tmp/smoke

For tests and for checking an installation; the scores mean nothing.
"""

from configs import demo


def get_config():
    config = demo.get_config()
    # The released head and timm's init, on nano: the parity tests compare
    # parameters to 1e-5, which the demo's large score-layer steps would not keep
    # meaningful (tests/test_train.py covers those options on their own).
    config.model.variant = 'nano'
    config.model.score_scale = 'model'
    config.model.hyper_conv_init = 'model'
    config.model.backbone_init = 'timm'
    config.model.patch_norm = True           # timm's Swin, so timm files load (tests)
    config.data.resize = (224, 224)          # smallest the 224 crop allows: fast decode
    config.data.patches_per_image = 1
    config.data.eval_crops = 1
    config.data.eval_crop_mode = 'center'
    config.data.cache = False
    config.data.rotate90 = False
    config.data.jpeg_aligned_crops = False
    config.data.max_images_per_split = 24
    config.train.batch_size = 4
    config.train.cpu_devices = 0             # JAX's default: the tests set the device count
    config.train.loss = 'l1'
    config.train.calibrate = False
    config.train.eval_batch_size = 8
    config.train.num_epochs = 2
    config.train.max_steps_per_epoch = 3
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 2
    config.train.progress_bar = False
    config.optim.warmup_epochs = 0.0
    # Low rates keep the device-count parity tests meaningful: Adam turns float
    # rounding in near-zero gradients into steps of up to the learning rate.
    config.optim.backbone.lr = config.optim.head.lr = 1e-4
    return config
