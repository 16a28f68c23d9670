"""The threaded image loader of runs whose trunk sees images (unfrozen or uncached phases), and
the batches of cached rows."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .data import DatasetError


class ImageLoader:
    """Decodes and preprocesses pool images in threads; batches group images of one input shape
    (the shorter-side policy gives a few shapes), so no batch needs padding."""

    def __init__(self, paths: list[str], preprocessing, workers: int = 2):
        self.paths = paths
        self.preprocessing = preprocessing
        self.workers = max(1, workers)
        self._shapes: dict[int, tuple] = {}

    def shape(self, i: int) -> tuple:
        if self.preprocessing.resize.mode == "square":
            return (self.preprocessing.resize.size,) * 2
        if i not in self._shapes:
            from PIL import Image

            try:
                with Image.open(self.paths[i]) as im:
                    w, h = im.size
                    if im.getexif().get(274, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                        w, h = h, w
            except Exception as exc:
                raise DatasetError(f"cannot read image {self.paths[i]} ({type(exc).__name__}: {exc})") from None
            self._shapes[i] = self.preprocessing.resize.output_size(w, h)
        return self._shapes[i]

    def batches(self, idx, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        """Batches of pool indices in `idx` order, one shape per batch; shuffled when rng is given.
        A training batch of one image is dropped (BatchNorm needs two)."""
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            groups.setdefault(self.shape(int(i)), []).append(int(i))
        out = []
        for members in groups.values():
            for lo in range(0, len(members), batch_size):
                out.append(np.asarray(members[lo:lo + batch_size]))
        if rng is not None:
            out = [b for b in out if len(b) > 1]
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def load(self, i: int, aug: str = "none"):
        from ..preprocess import decode_image
        from .features import apply_augmentation

        return apply_augmentation(self.preprocessing.image_to_tensor(decode_image(self.paths[i])), aug)

    def iterate(self, batches, augs=None, *, pin: bool = False, prefetch: int = 3):
        """Yield (images (B,3,H,W), batch indices), decoding the next batches in the background."""
        import torch

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            pending = []

            def submit(b):
                names = [augs[int(i)] if augs is not None else "none" for i in b]
                return b, [pool.submit(self.load, int(i), a) for i, a in zip(b, names)]

            it = iter(batches)
            for b in it:
                pending.append(submit(b))
                if len(pending) >= prefetch:
                    break
            while pending:
                b, futures = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                x = torch.stack([f.result() for f in futures])
                yield (x.pin_memory() if pin else x), b


def train_batches(idx: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cached rows in order, chunked; a last batch of one joins the one before (BatchNorm needs two)."""
    out = [idx[lo:lo + batch_size] for lo in range(0, len(idx), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = np.concatenate([out[-2], out.pop()])
    return out


