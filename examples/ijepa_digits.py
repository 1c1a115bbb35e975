"""A tiny I-JEPA on scikit-learn's 8x8 digits, trained on a laptop CPU.

What ``make demo`` runs; the code is the package ``examples/ijepa_digits/``
(start with its ``__init__.py``: the modules in reading order; the EMA target
lives in ``ijepa_digits/training.py``).

Usage::

  python examples/ijepa_digits.py                 # 3000 steps per run
  python examples/ijepa_digits.py --quick         # CI smoke run
  python examples/ijepa_digits.py --momentum cosine --checkpoint-dir /tmp/ck
  python examples/ijepa_digits.py --sweep --seeds 0 1 2 --out-dir docs
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ijepa_digits.main import main  # noqa: E402

if __name__ == "__main__":
  main()
