"""The one table of model sizes: Swin widths and depths, and SMART-IQA's released defaults.

Every other module looks variants up here; nothing else hard-codes a width.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
    """A Swin-T/S/B-style backbone size and the head's released regularisation.

    Attributes:
        embed_dim: channels C of stage 0; stage i has C * 2**i.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        dropout: dropout of the hyper feature and the target network (SPEC 1.5).
        drop_path_rate: stochastic depth at the last block (linear from 0).
        timm_name: the timm model whose checkpoints fit this backbone, if any.
    """

    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    dropout: float
    drop_path_rate: float
    timm_name: str | None = None

    @property
    def stage_dims(self) -> tuple[int, int, int, int]:
        return tuple(self.embed_dim * 2**i for i in range(4))


VARIANTS: dict[str, Variant] = {
    # A narrow Swin for training from scratch on a CPU (the demo); not in the paper.
    'nano': Variant(32, (1, 1, 2, 1), (1, 2, 4, 8), dropout=0.1, drop_path_rate=0.0),
    # Narrower still, one block per stage: 2-3x nano's training images per second
    # on a 2-core CPU (the demo's budget is minutes, so steps count more than width).
    'pico': Variant(16, (1, 1, 1, 1), (1, 2, 4, 8), dropout=0.1, drop_path_rate=0.0),
    'tiny': Variant(96, (2, 2, 6, 2), (3, 6, 12, 24), dropout=0.3, drop_path_rate=0.2,
                    timm_name='swin_tiny_patch4_window7_224'),
    'small': Variant(96, (2, 2, 18, 2), (3, 6, 12, 24), dropout=0.35, drop_path_rate=0.25,
                     timm_name='swin_small_patch4_window7_224'),
    'base': Variant(128, (2, 2, 18, 2), (4, 8, 16, 32), dropout=0.4, drop_path_rate=0.3,
                    timm_name='swin_base_patch4_window7_224'),
}


def get_variant(name: str) -> Variant:
    """Returns the variant called `name`, or raises a ValueError listing the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
                f'unknown model variant {name!r}; choose one of {", ".join(VARIANTS)}') from None
