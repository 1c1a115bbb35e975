"""Checkpoints: orbax, with a configuration fingerprint checked on resume.

:class:`Checkpointer` saves the whole train state (params, optimizer state,
EMA state, step, RNG, curves) every ``every`` steps; running again with the
same directory resumes bit-identically, and a directory written by another
configuration, or damaged, raises :class:`CheckpointError`. Its ``kill_at``
hook lets the tests SIGKILL the process at known points of a save.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import sys
from typing import Any

import jax
import numpy as np


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be resumed from (never ignored)."""


def tree_digest(tree: Any) -> str:
  """sha256 of the bytes of ``tree``'s leaves, in leaf order."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


def _kill_self() -> None:
  """SIGKILLs this process, as ``kill -9`` would (test hook)."""
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _killed_before_commit(ocp: Any, step: int) -> type:
  """orbax's local temporary-path class, SIGKILLing the process when it is
  about to commit checkpoint ``step``: its data are written, but its folder
  still has its temporary name (test hook)."""

  class KilledBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
    async def finalize(self, *args, **kwargs):
      if self.get_final().name == str(step):  # the step folder, not an item
        _kill_self()
      return await super().finalize(*args, **kwargs)

  return KilledBeforeCommit


class Checkpointer:
  """orbax CheckpointManager + a config fingerprint that must match on resume.

  ``kill_at`` is a test hook (``--test-kill-at``) for a real ``kill -9`` at a
  known point: ``("after", n)`` SIGKILLs the process once checkpoint ``n``
  is committed, ``("commit", n)`` inside the save of checkpoint ``n``, after
  its data are written and before orbax commits them."""

  def __init__(
    self,
    directory: pathlib.Path,
    every: int,
    fingerprint: dict,
    kill_at: tuple[str, int] | None = None,
  ):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.dir = directory.resolve()
    self.dir.mkdir(parents=True, exist_ok=True)
    meta = self.dir / "config.json"
    if meta.exists():
      try:
        saved = json.loads(meta.read_text())
      except json.JSONDecodeError as e:
        raise CheckpointError(
          f"{meta} is corrupt ({e}); remove {self.dir} to start over."
        ) from e
      if saved != fingerprint:
        diff = {
          k: (saved.get(k), fingerprint.get(k))
          for k in set(saved) | set(fingerprint)
          if saved.get(k) != fingerprint.get(k)
        }
        raise CheckpointError(
          f"checkpoint in {self.dir} was written by a different "
          f"configuration (saved vs now: {diff}); use another "
          "--checkpoint-dir or the same settings."
        )
    else:
      meta.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    self.every = every
    self.kill_at = kill_at
    options = {"max_to_keep": 2, "enable_async_checkpointing": False}
    if kill_at is not None and kill_at[0] == "commit":
      options["temporary_path_class"] = _killed_before_commit(ocp, kill_at[1])
    self.mngr = ocp.CheckpointManager(
      self.dir / "state", options=ocp.CheckpointManagerOptions(**options)
    )

  def restore(self, abstract: Any) -> Any:
    step = self.mngr.latest_step()
    if step is None:
      if any((self.dir / "state").glob("*")):
        raise CheckpointError(
          f"{self.dir / 'state'} holds files but no complete checkpoint; "
          "it is corrupt. Remove it to start over."
        )
      return None
    try:
      state = self.mngr.restore(
        step, args=self._ocp.args.StandardRestore(abstract)
      )
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(
        f"cannot restore step {step} from {self.dir / 'state'}: "
        f"{type(e).__name__}: {e}"
      ) from e
    if int(state.step) != step:
      raise CheckpointError(
        f"checkpoint {step} in {self.dir} holds step "
        f"{int(state.step)}; it is corrupt."
      )
    return state

  def maybe_save(self, state: Any, final: bool = False) -> None:
    step = int(state.step)
    if step in self.mngr.all_steps():
      return  # e.g. a finished run resumed again: nothing new to save
    if final or step % self.every == 0:
      self.mngr.save(step, args=self._ocp.args.StandardSave(state), force=final)
      if self.kill_at == ("after", step):
        self.mngr.wait_until_finished()
        _kill_self()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()
