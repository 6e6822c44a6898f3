"""Run an iterator in a background thread, a bounded number of items ahead of the consumer."""

from __future__ import annotations

import queue
import threading
from typing import Generator, Generic, Iterator, Tuple, TypeVar

T = TypeVar("T")

PREFETCH_THREAD_NAME = "dtn-reader-prefetch"
_ITEM, _END, _ERROR = 0, 1, 2
_POLL_S = 0.05


class Prefetcher(Generic[T]):
    """Iterates ``source`` in a daemon thread into a queue of at most ``depth`` items.

    An exception raised by ``source`` is re-raised in the consumer at the point it was raised
    in the stream. When the consumer stops early (``close()``, or the generator returned by
    ``__iter__`` is closed or garbage-collected), the thread stops at its next put and the
    source generator is closed in that thread.
    """

    def __init__(self, source: Generator[T, None, None], depth: int) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source = source
        self._queue: "queue.Queue[Tuple[int, object]]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=PREFETCH_THREAD_NAME, daemon=True)
        self._thread.start()

    def _put(self, message: Tuple[int, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put((_ERROR, e))
        finally:
            self._source.close()

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                kind, payload = self._queue.get()
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise payload  # type: ignore[misc]
                yield payload  # type: ignore[misc]
        finally:
            self.close()

    def close(self) -> None:
        """Stops the thread and waits for it."""
        self._stop.set()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
