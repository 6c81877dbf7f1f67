"""The checkpoint manager: one call in the training loop saves on schedule, in the background, and prunes.

The training thread does only what must read the live state: the gather of the k
masked values (and the exact check's scan, when it is on), and a copy of the
optimizer's and scheduler's state. Coding, compression, the fsync'd write and
pruning run on a background thread. At most one save is in flight: a save that
finds the previous one still running waits for it, so no checkpoint is ever
dropped, and a failure in the background is raised, with its own type, on the
next call into the manager.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import torch

from ..errors import InvalidArgumentError, OutsideMaskWarning, StepNotFoundError
from ..sharding import any_dtensor, process_group
from ..store.capture import StateLike, state_of
from ..store.records import SaveInfo
from ..store.store import CheckpointStore, outside_mask_summary

logger = logging.getLogger("fishckpt")


class Checkpointer:
    """Saves a training run into a ``CheckpointStore`` on a schedule, asynchronously, with retention.

    Args:
        store: The store to save into (create it from the starting weights first).
        every: Save when ``step % every == 0``.
        keep_last: Keep only the newest N steps (pruned in the background); None keeps all.
        keep_every: Also keep every step divisible by M, whatever ``keep_last`` says.
        async_save: Write on a background thread (default). ``False`` saves in the call.
        check_outside_mask: Run the exact check at each save (docs/exactness.md); ``False`` is
            the fast path for states trained only through ``SparseAdamW``.
        rng: Save the global random states with each step, for an exact resume.
        overwrite: Replace a step that is saved already (default: that is an error).
        device_check: How the exact check runs (see ``CheckpointStore.save``): by default a
            checksum on the device for CUDA tensors, the xxh3 scan for CPU tensors.
        writer: Whether this process writes. None decides by itself: under ``torch.distributed``
            (DDP), rank 0 writes and the other ranks wait at a barrier and never touch the store.
            A state of DTensors (FSDP2) is saved by every rank, each its own shard, whatever
            ``writer`` says; rank 0 prunes.

    Example:
        >>> with fishckpt.Checkpointer(store, every=100, keep_last=3) as ckpt:
        ...     start = ckpt.resume(model, optimizer, scheduler) or 0
        ...     for step in range(start + 1, total + 1):
        ...         train_one_step()
        ...         ckpt.step(step, model, optimizer, scheduler)
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        every: int = 1,
        keep_last: int | None = None,
        keep_every: int | None = None,
        async_save: bool = True,
        check_outside_mask: bool = True,
        rng: bool = True,
        overwrite: bool = False,
        writer: bool | None = None,
        device_check: bool | None = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise InvalidArgumentError(f"every must be a positive integer, got {every!r}")
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidArgumentError(f"{name} must be a positive integer or None, got {value!r}")
        self.store = store
        self.every = every
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.check_outside_mask = check_outside_mask
        self.rng = rng
        self.overwrite = overwrite
        self.device_check = device_check
        self._group = process_group()
        self.writer = (self._group is None or self._group[0] == 0) if writer is None else writer
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._done: SaveInfo | None = None
        self.last: SaveInfo | None = None
        self._warned = False
        self._closed = False
        self._saved: list[int] | None = None  # steps in the store, tracked so retention is O(1) per save
        self._protected: frozenset[int] = frozenset()  # replaced whole, so the background thread reads one set
        self.blocked_seconds: deque[float] = deque(maxlen=1000)  # the training thread's time in each recent save

    # The loop ---------------------------------------------------------------------------------------

    def step(
        self,
        step: int,
        model: StateLike,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """The one call inside the loop: saves ``step`` if the schedule says so, and returns at once otherwise.

        Returns:
            Whether a save of this step was started.

        Raises:
            Whatever a previous background save raised (a full disk, a lock held elsewhere), with its own type.
        """
        self._collect()
        if step % self.every:
            return False
        self.save(step, model, optimizer, scheduler, metadata)
        return True

    def save(
        self,
        step: int,
        model: StateLike,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Saves ``step`` now, whatever the schedule (the final step of a run, say)."""
        if self._closed:
            raise InvalidArgumentError("this Checkpointer is closed; make a new one")
        started = time.perf_counter()
        self._finish()  # backpressure: at most one save in flight, and never a dropped one
        state = state_of(model)
        # Sharded training (DTensors): every rank writes its own shard, and the store's commit
        # brings the ranks together; otherwise (DDP's replicas) one writer and a barrier.
        sharded = any_dtensor(state.values())
        if not self.writer and not sharded:
            self._barrier()
            return
        pending = self.store.capture(
            state,
            step,
            metadata=metadata,
            check_outside_mask=self.check_outside_mask,
            overwrite=self.overwrite,
            optimizer=optimizer,
            scheduler=scheduler,
            rng=self.rng,
            device_check=self.device_check,
        )
        if self.async_save:
            # Not a daemon: at interpreter exit Python waits for it, so a pending save completes.
            self._thread = threading.Thread(target=self._commit, args=(pending,), name=f"fishckpt-save-{step}")
            self._thread.start()
        else:
            self._commit(pending)
            self._collect()
        self.blocked_seconds.append(time.perf_counter() - started)
        if not sharded:
            self._barrier()

    def wait(self) -> SaveInfo | None:
        """Waits for the save in flight, if any; returns the last save's SaveInfo, or raises its failure."""
        self._finish()
        return self.last

    def close(self) -> None:
        """Waits for the save in flight and ends the manager; a failure of that save is raised."""
        if self._closed:
            return
        try:
            self._finish()
        finally:
            self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is None:
            self.close()
            return
        # The loop failed: still let the pending save complete, but never hide the loop's own error.
        try:
            self.close()
        except Exception as failure:
            logger.error("fishckpt: the last checkpoint save also failed: %r", failure)

    def protect(self, steps: Iterable[int]) -> None:
        """Steps that retention never deletes, whatever ``keep_last`` says; replaces the previous set.

        For a step chosen by something other than age, such as the best evaluation so far
        (``load_best_model_at_end`` in Hugging Face's Trainer). Protecting a step that is not
        saved, or not yet, is allowed.

        Example:
            >>> ckpt.protect([best_step])   # pruned again once another step is protected instead
        """
        self._protected = frozenset(int(step) for step in steps)

    # Resuming ------------------------------------------------------------------------------------------

    def resume(
        self,
        model: StateLike,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        step: int | None = None,
    ) -> int | None:
        """Restores the latest step (or ``step``) into ``model``, the optimizer, scheduler and RNG states.

        Training then continues bit for bit as if it had never stopped. Every rank restores
        from the same step. Returns the step restored, or None if the store has none yet.
        """
        return resume(self.store, model, optimizer, scheduler, step=step, rng=self.rng)

    # The background side ---------------------------------------------------------------------------------

    def _commit(self, pending: Any) -> None:
        try:
            info = self.store.commit(pending)
            self._done = info
            self._retain(info.step)
        except BaseException as error:  # handed to the training thread, raised there with its own type
            self._failure = error

    def _retain(self, step: int) -> None:
        if self.keep_last is None and self.keep_every is None:
            return
        if self._group is not None and self._group[0] != 0:
            return  # one rank prunes (a sharded save commits on every rank)
        if self._saved is None:
            self._saved = self.store.steps
        if step not in self._saved:
            self._saved.append(step)
            self._saved.sort()
        newest = set(self._saved[-self.keep_last :]) if self.keep_last is not None else set(self._saved)
        keep_every, protected = self.keep_every, self._protected
        doomed = [
            s
            for s in self._saved
            if s not in newest and s not in protected and not (keep_every is not None and s % keep_every == 0)
        ]
        for old in doomed:
            with contextlib.suppress(StepNotFoundError):  # deleted by someone else meanwhile: gone either way
                self.store.delete(old)
            self._saved.remove(old)

    def _finish(self) -> None:
        """Joins the save in flight and raises its failure, once."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        self._collect()

    def _collect(self) -> None:
        """Reports a finished background save: raises its failure, or warns about changes outside the mask."""
        if self._thread is not None and self._thread.is_alive():
            return
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        info, self._done = self._done, None
        if info is None:
            return
        self.last = info
        if info.changed_outside_mask:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    OutsideMaskWarning(
                        f"step {info.step}: {outside_mask_summary(info)}. This manager warns once; later saves "
                        "with changes outside the mask are logged (logger 'fishckpt')"
                    ),
                    stacklevel=3,
                )
            else:
                logger.info("fishckpt: step %d: %s", info.step, outside_mask_summary(info))

    def _barrier(self) -> None:
        if self._group is not None:
            import torch.distributed as dist

            dist.barrier()


def resume(
    store: CheckpointStore,
    model: StateLike,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    step: int | None = None,
    rng: bool = True,
) -> int | None:
    """Restores the latest step of ``store`` (or ``step``) into a model, optimizer, scheduler and RNG states.

    Returns:
        The step restored, or None if the store holds no step yet.
    """
    if step is None:
        saved = store.steps
        step = saved[-1] if saved else None
        group = process_group()
        if group is not None:  # every rank resumes from the step rank 0 found, even if saves raced the listing
            from ..store import sharded

            step = sharded.broadcast_json(step, sharded.ranks())  # JSON over gloo: any backend, no pickle
        if step is None:
            return None
    store.load_into(model, step)
    store.load_training_state(step, optimizer, scheduler, rng=rng)
    return step
