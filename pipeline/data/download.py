"""``pipeline download multi30k DIR``: fetch the public Multi30k task-1 raw files."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

MULTI30K_BASE = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
MULTI30K_FILES = [
    f"{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr") for lang in ("en", "de", "fr", "cs")
]


def download_multi30k(dest: str, base: str = MULTI30K_BASE, timeout: float = 30.0) -> Path:
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    for name in MULTI30K_FILES:
        target = root / name
        if target.exists() and target.stat().st_size > 0:
            continue
        url = f"{base}/{name}"
        print(f"[download] {url}", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (base is our https constant)
                data = r.read()
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(
                f"cannot download {url} ({e}); are you offline? Alternatively point "
                f"data.root at an existing copy of the Multi30k raw files"
            ) from e
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    print(f"[download] Multi30k in {root}: use data=multi30k data.root={root}", flush=True)
    return root
