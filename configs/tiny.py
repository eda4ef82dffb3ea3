r"""Swin-Tiny SMART-IQA on KonIQ-10k; otherwise the paper's setup (configs/base.py).

  python -m smartiqa_jax.train --config configs/tiny.py --workdir workdirs/tiny \
      --config.data.root=/data/koniq10k --config.model.backbone_weights=/weights/swin_tiny.safetensors
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.variant = 'tiny'
    return config
