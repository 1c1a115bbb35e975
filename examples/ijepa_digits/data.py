"""The data: scikit-learn's bundled 8x8 digits as standardised 2x2 patches.

1797 images, no download. A fixed stratified 80/20 split (``random_state=0``);
pretraining uses only the 1437 training images, without labels. Each image
becomes 16 tokens (a 4x4 grid) of 4 pixels.
"""

from __future__ import annotations

import numpy as np

GRID = 4  # 8x8 image, 2x2 patches -> 4x4 tokens
NUM_TOKENS = GRID * GRID
PATCH_DIM = 4


def load_data() -> dict[str, np.ndarray]:
  """Digits as (N, 16, 4) standardised patch arrays, with a fixed 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8)
  tr, te = train_test_split(
    np.arange(len(images)),
    test_size=0.2,
    random_state=0,
    stratify=digits.target,
  )
  # One mean and std over all training pixels (per-pixel statistics would
  # divide the always-blank border pixels by ~0).
  images = (images - images[tr].mean()) / images[tr].std()
  patches = images.reshape(-1, GRID, 2, GRID, 2).transpose(0, 1, 3, 2, 4)
  patches = patches.reshape(-1, NUM_TOKENS, PATCH_DIM)
  return {
    "x_train": patches[tr],
    "y_train": digits.target[tr],
    "x_test": patches[te],
    "y_test": digits.target[te],
    "pix_train": images[tr].reshape(len(tr), -1),
    "pix_test": images[te].reshape(len(te), -1),
  }
