"""A tiny I-JEPA on scikit-learn's 8x8 digits, trained on a laptop CPU.

What ``make demo`` runs (``python examples/ijepa_digits.py``). It shows
``jepa_ema`` doing its real job: the target encoder of a JEPA is an EMA of the
context encoder (stop-gradient). The EMA target learns a representation far
better than its random initialisation, and without the EMA (momentum 0: the
target is a plain stop-gradient copy of the online encoder) the
representation collapses.

The modules, in reading order (each imports only those above it):

* :mod:`ijepa_digits.config`: :class:`~ijepa_digits.config.Config`, every
  hyperparameter, and the ``--momentum`` spec as a ``jepa_ema`` schedule.
* :mod:`ijepa_digits.data`: the digits as standardised 2x2 patches, a fixed
  80/20 split.
* :mod:`ijepa_digits.model`: the ViT context encoder and the predictor (Flax
  Linen), with fixed sin-cos positions.
* :mod:`ijepa_digits.masks`: one target block, a random context.
* :mod:`ijepa_digits.evaluation`: k-NN, few-shot and linear probes, and the
  collapse measures, on embeddings.
* :mod:`ijepa_digits.checkpoints`: orbax, with a fingerprint checked on
  resume.
* :mod:`ijepa_digits.training`: the train state, the compiled step and the
  loop. **The EMA target lives here**, in ``build``: its docstring lists the
  four places.
* :mod:`ijepa_digits.figures`, :mod:`ijepa_digits.sweep`: the plots and the
  momentum sweep.
* :mod:`ijepa_digits.main`: the command line.

The experiments (``examples/batch_scaling.py``, ``examples/posthoc_digits.py``,
``examples/policy_digits.py``) import these modules' public names.
"""
