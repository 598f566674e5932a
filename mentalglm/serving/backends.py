"""What generates behind serve.py's routes: `hf` (the project's batched generation, `DynamicBatcher`) or `vllm`
(a vLLM server the project started, `serving/vllm.py`).

A backend takes the rows of one request (`submit`) at once or not at all: a full queue raises `QueueFull` before
anything is queued, so the server can still answer 503 before a stream starts. Each row's answer comes back as a
`RowResult` (text, tokens generated, finish reason); a row whose `cancelled()` turns true stops generating.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Protocol

from mentalglm.config import ServeSettings
from mentalglm.runtime.generation import RowRequest, RowResult
from mentalglm.serving.batcher import Cancelled, DynamicBatcher, QueueFull
from mentalglm.serving.predictor import Predictor


@dataclass(frozen=True)
class ServedModel:
    """One model id of the server: its prompts (rendered with its run's templates) and its LoRA adapter on the
    shared base (the adapter's name there; None: the base alone)."""

    predictor: Predictor
    adapter: str | None


PRIMARY = "default"  # peft's name of the adapter loaded first (adapter= / run_dir=)


class Backend(Protocol):
    name: str
    predictor: Predictor

    def submit(self, rows: list[RowRequest]) -> list[Awaitable[RowResult]]: ...

    def close(self) -> None: ...


class HFBackend:
    name = "hf"

    def __init__(self, predictor: Predictor, settings: ServeSettings):
        self.predictor = predictor
        self.batcher = DynamicBatcher(
            predictor.model,
            predictor.tokenizer,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
        )

    def submit(self, rows: list[RowRequest]) -> list[Awaitable[RowResult]]:
        loop = asyncio.get_running_loop()
        futures = []
        try:
            for row in rows:
                push = row.on_text
                if push is not None:  # the batcher's thread hands each piece to the event loop
                    row = replace(row, on_text=lambda piece, push=push: loop.call_soon_threadsafe(push, piece))
                futures.append(self.batcher.submit(row))
        except QueueFull:
            for future in futures:  # all rows or none: the queued ones are skipped by the batcher
                future.cancel()
            raise
        return [asyncio.wrap_future(f) for f in futures]

    def close(self) -> None:
        self.batcher.close()


class VLLMBackend:
    name = "vllm"

    def __init__(self, predictor: Predictor, client, settings: ServeSettings):
        from mentalglm.serving.vllm import BASE_NAME

        self.predictor, self.client = predictor, client
        self.queue_size, self.gate = settings.queue_size, asyncio.Semaphore(settings.max_batch_size * 4)
        self.waiting = 0
        # adapter name -> the model name vLLM serves it under (the first adapter: the server's model name)
        self.names = {PRIMARY: settings.model_name, None: BASE_NAME, "": client.model}

    def submit(self, rows: list[RowRequest]) -> list[Awaitable[RowResult]]:
        if self.waiting + len(rows) > self.queue_size:
            raise QueueFull()
        self.waiting += len(rows)
        return [asyncio.ensure_future(self._one(row)) for row in rows]

    async def _one(self, row: RowRequest) -> RowResult:
        try:
            await self.gate.acquire()
        finally:
            self.waiting -= 1
        try:
            if row.cancelled():
                raise Cancelled()
            return await self.client.complete_row(row, model=self.names.get(row.adapter, row.adapter))
        finally:
            self.gate.release()

    def close(self) -> None:
        pass
