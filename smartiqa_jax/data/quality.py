"""Bad-data policy: every bad entry is fixed or excluded with a reason, never fatal.

Readers and builders report each problem through a `DataReport`: in the
default lenient mode the entry is dropped with a warning naming the file and
the reason, and `DataReport.summary()` gives the counts that the loaders print
before training. With `strict=True` the first problem raises `DataError`
instead, for when a silently smaller dataset would be worse than no run.

Images that decode but are unusual (CMYK, grayscale, RGBA, palette, 16-bit,
EXIF-rotated, smaller than the crop) are not problems: `preprocess` converts
them. Only files that cannot become RGB pixels are excluded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
from typing import Any, Callable, Optional, Sequence

from smartiqa_jax import preprocess

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset problem in strict mode, or a layout the reader cannot use."""


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str     # the file as the metadata lists it
    reason: str   # short, e.g. 'missing file', 'score is NaN'


@dataclasses.dataclass
class DataReport:
    """What a reader or builder kept and what it excluded, and why."""
    dataset: str
    strict: bool = False
    problems: list[Problem] = dataclasses.field(default_factory=list)
    kept: dict[str, int] = dataclasses.field(default_factory=dict)

    def exclude(self, name: str, reason: str) -> None:
        """Records that `name` is left out; raises DataError in strict mode."""
        if self.strict:
            raise DataError(f'{self.dataset}: {name}: {reason} (strict mode)')
        log.warning('%s: excluding %s: %s', self.dataset, name, reason)
        self.problems.append(Problem(name, reason))

    def summary(self) -> str:
        """One short paragraph: kept per split, excluded per reason with examples."""
        kept = ', '.join(f'{k} {v}' for k, v in self.kept.items()) or 'nothing'
        lines = [f'{self.dataset}: kept {kept}; excluded {len(self.problems)}']
        by_reason = collections.defaultdict(list)
        for p in self.problems:
            by_reason[p.reason.split(' (')[0]].append(p.name)
        for reason, names in sorted(by_reason.items()):
            shown = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
            lines.append(f'  {len(names)} x {reason}: {shown}')
        return '\n'.join(lines)


def parse_score(raw: Any) -> tuple[Optional[float], str]:
    """A metadata cell -> (score, '') or (None, why it is unusable)."""
    if raw is None:
        return None, 'score is empty'
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            return None, 'score is empty'
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None, f'score is not a number ({raw!r})'
    if math.isnan(value):
        return None, 'score is NaN'
    if math.isinf(value):
        return None, 'score is infinite'
    return value, ''


def check_file(path: str) -> str:
    """'' if `path` is a non-empty regular file, else the reason it is not usable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 'file listed but missing'
    except OSError as e:
        return f'cannot stat file ({e.strerror})'
    if not os.path.isfile(path):
        return 'not a regular file'
    if st.st_size == 0:
        return 'empty file (0 bytes)'
    return ''


def decode_problem(image: Any, name: str) -> str:
    """'' if the image decodes to RGB, else the reason (decodes it once, fully)."""
    try:
        preprocess.decode_image(preprocess.read_bytes(image), name)
    except preprocess.ImageDecodeError as e:
        return str(e).removeprefix(f'{name}: ')
    except OSError as e:
        return f'cannot read file ({e.strerror or e})'
    return ''


def find_undecodable(items: Sequence[Any], names: Sequence[str],
                     num_threads: int = 0) -> list[str]:
    """Reason per item ('' = fine) from a full decode; threads (PIL frees the GIL)."""
    num_threads = num_threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        return list(pool.map(decode_problem, items, names))


def drop_duplicates(entries: Sequence[Any], key: Callable[[Any], str],
                    report: DataReport,
                    row_of: Optional[Callable[[Any], int]] = None) -> list[Any]:
    """Keeps the first entry per key; later ones are excluded as duplicates.

    row_of: the entry's 1-based row in the metadata, for the message (default: its
    position in `entries`).
    """
    first_row = {}
    kept = []
    for position, entry in enumerate(entries):
        k = key(entry)
        row = row_of(entry) if row_of else position + 1
        if k in first_row:
            report.exclude(k, f'duplicate entry (first listed at row {first_row[k]})')
            continue
        first_row[k] = row
        kept.append(entry)
    return kept
