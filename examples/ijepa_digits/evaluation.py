"""The one evaluation every frozen encoder (and raw pixels) gets.

NumPy and scikit-learn on embeddings: cosine k-NN, 1-/5-shot and full-label
logistic regression (:func:`evaluate`), and two collapse measures,
:func:`embedding_std` and :func:`effective_rank`. Nothing here knows the
model; :func:`ijepa_digits.training.encoder_metrics` embeds the images.
"""

from __future__ import annotations

import numpy as np


def _unit(z: np.ndarray) -> np.ndarray:
  return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def embedding_std(z: np.ndarray) -> float:
  """RMS per-dimension std of the L2-normalised embeddings: 0 when they
  collapse to one direction, ``1/sqrt(dim)`` at most (isotropic). Rotation
  invariant (it is ``sqrt(trace(cov) / dim)``)."""
  u = _unit(np.asarray(z, np.float64))
  return float(np.sqrt(np.mean(np.var(u, axis=0))))


def effective_rank(z: np.ndarray) -> float:
  """RankMe (Garrido et al., arXiv:2210.02885): exp entropy of the singular
  values of the (uncentred) embedding matrix; ~1 for collapsed embeddings."""
  s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
  p = s / max(s.sum(), 1e-300) + 1e-12
  return float(np.exp(-np.sum(p * np.log(p))))


def knn_accuracy(
  z_train: np.ndarray,
  y_train: np.ndarray,
  z_test: np.ndarray,
  y_test: np.ndarray,
  k: int = 5,
) -> float:
  """Cosine k-NN, majority vote (ties: the smaller label), stable order."""
  sim = _unit(z_test) @ _unit(z_train).T
  nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(z_test), int(y_train.max()) + 1))
  np.add.at(votes, (np.arange(len(z_test))[:, None], y_train[nearest]), 1)
  return float(np.mean(votes.argmax(1) == y_test))


def evaluate(
  z_train: np.ndarray,
  z_test: np.ndarray,
  y_train: np.ndarray,
  y_test: np.ndarray,
  seed: int = 0,
  draws: int = 10,
) -> dict[str, float]:
  """The one evaluation every encoder (and raw pixels) gets.

  Embeddings are centred on the training mean and scaled by one number (so
  that the mean per-dimension variance on the training set is 1), so every
  score is invariant to a rotation (and a rescaling) of the embedding space.
  Then: cosine k-NN (k=5) with all training labels;
  logistic regression (C=1) on 1 and 5 labelled images per class (mean over
  ``draws`` label draws, the same draws for every encoder) and on all of
  them; and, on the raw test embeddings, :func:`embedding_std` and
  :func:`effective_rank`.
  """
  from sklearn.linear_model import LogisticRegression

  z_train = np.asarray(z_train, np.float64)
  z_test = np.asarray(z_test, np.float64)
  mean = z_train.mean(0)
  scale = max(float(np.sqrt(np.mean((z_train - mean) ** 2))), 1e-12)
  a, b = (z_train - mean) / scale, (z_test - mean) / scale

  def probe(idx: np.ndarray) -> float:
    clf = LogisticRegression(C=1.0, max_iter=3000)
    return float(clf.fit(a[idx], y_train[idx]).score(b, y_test))

  rng = np.random.default_rng(seed + 1234)
  classes = np.unique(y_train)
  shots = {}
  for n in (1, 5):
    picks = [
      np.concatenate(
        [
          rng.choice(np.flatnonzero(y_train == c), n, replace=False)
          for c in classes
        ]
      )
      for _ in range(draws)
    ]
    shots[n] = float(np.mean([probe(p) for p in picks]))
  return {
    "knn5": knn_accuracy(a, y_train, b, y_test, 5),
    "1shot": shots[1],
    "5shot": shots[5],
    "linear": probe(np.arange(len(a))),
    "emb_std": embedding_std(z_test),
    "eff_rank": effective_rank(z_test),
  }
