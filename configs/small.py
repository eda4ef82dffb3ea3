r"""Swin-Small SMART-IQA on KonIQ-10k; otherwise the paper's setup (configs/base.py).

  python -m smartiqa_jax.train --config configs/small.py --workdir workdirs/small \
      --config.data.root=/data/koniq10k --config.model.backbone_weights=/weights/swin_small.safetensors
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.variant = 'small'
    return config
