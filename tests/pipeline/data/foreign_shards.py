"""Foreign WebDataset shards for tests, written the way other tools write them: webdataset's
`ShardWriter` with JPEG members of mixed sizes cut from scikit-image's photos, `.json` and `.txt`
side members (and `.cls` when asked), named by a brace pattern; on local disk or uploaded to S3.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.storage import StorageConfig, fsspec_filesystem, join_url

# (height, width) of the patches, cycled: portrait, landscape, square, tiny, and one big one.
SIZES = ((96, 64), (64, 112), (80, 80), (24, 40), (280, 220))


@dataclass(frozen=True)
class Photo:
    key: str
    jpeg: bytes
    width: int
    height: int
    label: int | None


def _photos() -> list[np.ndarray]:
    from skimage import data

    grey = data.camera()
    return [data.astronaut(), data.coffee(), data.chelsea(), np.dstack([grey, grey, grey])]


def make_photos(count: int, labels: bool = False, quality: int = 90) -> list[Photo]:
    """`count` JPEG patches of mixed sizes, keyed like img2dataset keys ("000000012")."""
    from PIL import Image

    photos, sources = [], _photos()
    for i in range(count):
        source = sources[i % len(sources)]
        height, width = SIZES[i % len(SIZES)]
        top = (37 * i) % (source.shape[0] - height + 1)
        left = (53 * i) % (source.shape[1] - width + 1)
        patch = source[top : top + height, left : left + width]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(patch)).save(buffer, format="JPEG", quality=quality)
        label = i % 3 if labels else None
        photos.append(Photo(f"{i:09d}", buffer.getvalue(), width, height, label))
    return photos


def write_shards(
    folder: Path, photos: list[Photo], per_shard: int, start_shard: int = 0
) -> list[Path]:
    """`photos` as shards `folder/{start:06d}.tar`, ... via webdataset.ShardWriter."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with wds.ShardWriter(
        str(folder / "%06d.tar"), maxcount=per_shard, start_shard=start_shard, verbose=0
    ) as sink:
        for photo in photos:
            sample = {
                "__key__": photo.key,
                "jpg": photo.jpeg,
                "json": json.dumps({"width": photo.width, "height": photo.height}).encode(),
                "txt": f"a photo, {photo.width}x{photo.height}",
            }
            if photo.label is not None:
                sample["cls"] = str(photo.label).encode()
            sink.write(sample)
    count = -(-len(photos) // per_shard)
    written = [folder / f"{start_shard + i:06d}.tar" for i in range(count)]
    assert all(path.exists() for path in written)
    return written


def upload(paths: list[Path], prefix: str, storage: StorageConfig) -> list[str]:
    """Copy local shards under the S3 `prefix`; their URLs."""
    urls = []
    for path in paths:
        url = join_url(prefix, path.name)
        fs, key = fsspec_filesystem(url, storage)
        fs.put_file(str(path), key)
        urls.append(url)
    return urls
