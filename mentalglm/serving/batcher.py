"""Dynamic batching for the `hf` backend: concurrent requests are generated together.

Requests wait in a bounded queue; a worker thread takes the first, waits up to `max_wait_ms` for more (at most
`max_batch_size`) and generates them as one batch (`runtime.generation.generate_rows`: each row keeps its own
token cap, stop strings, streamed text and cancellation, so each answer equals the answer it would get alone).
A full queue is refused at once (the server answers 503), never left to grow. With several LoRA adapters on one
base, a batch's rows are generated adapter by adapter (each group one `generate`, the adapter switched between).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future

from mentalglm.runtime.generation import RowRequest, generate_rows

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    pass


class DynamicBatcher:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_wait_ms: float = 10.0, queue_size: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self._queue: queue.Queue[tuple[RowRequest, Future]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self.batches = 0  # batches generated (sizes in `batch_sizes`): what dynamic batching did
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._run, name="mentalglm-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, row: RowRequest) -> Future:
        future: Future = Future()
        try:
            self._queue.put_nowait((row, future))
        except queue.Full:
            raise QueueFull() from None
        return future

    def _take_batch(self) -> list[tuple[RowRequest, Future]]:
        try:
            batch = [self._queue.get(timeout=0.05)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=max(left, 0)) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take_batch()
            live = []
            for row, future in batch:
                if row.cancelled() or not future.set_running_or_notify_cancel():
                    if not future.done():
                        future.set_exception(Cancelled())
                    continue
                live.append((row, future))
            if not live:
                continue
            groups: dict[str | None, list[tuple[RowRequest, Future]]] = {}
            for row, future in live:
                groups.setdefault(row.adapter, []).append((row, future))
            for adapter, group in groups.items():
                self._generate(adapter, group)

    def _generate(self, adapter: str | None, group: list[tuple[RowRequest, Future]]) -> None:
        try:
            with using_adapter(self.model, adapter):
                results = generate_rows(self.model, self.tokenizer, [row for row, _ in group])
        except Exception as e:  # a failed batch fails its requests, not the server
            log.exception("generation failed for a batch of %d", len(group))
            for _, future in group:
                future.set_exception(e)
            return
        self.batches += 1
        self.batch_sizes.append(len(group))
        for (_, future), result in zip(group, results):
            future.set_result(result)

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued and in flight, then stop (graceful shutdown)."""
        self._stop.set()
        self._thread.join(timeout)


def using_adapter(model, adapter: str | None):
    """The context in which `model` generates with `adapter` (a peft adapter name; None: the base alone; "": as is)."""
    if adapter == "" or not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()
