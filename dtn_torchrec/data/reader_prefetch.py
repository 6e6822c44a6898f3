"""Run an iterator in a background thread, a bounded number of items ahead of the consumer, and
map a function over an iterator on a pool of threads, results in order."""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Generator, Generic, Iterable, Iterator, Optional, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")

PREFETCH_THREAD_NAME = "dtn-reader-prefetch"
WORKER_THREAD_PREFIX = "dtn-reader-worker"
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


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Generator[R, None, None]:
    """``fn(item)`` for each item, in item order, computed on ``workers`` threads.

    At most ``2 * workers`` calls are in flight (submitted ahead of the consumer); ``workers == 1``
    calls ``fn`` in the consuming thread. An exception of ``fn``, or of ``items``, is raised where
    its result (or the item's result) would have been yielded. Closing the generator cancels the
    calls not started and waits for the running ones.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        for item in items:
            yield fn(item)
        return
    pending: Deque["Future[R]"] = deque()
    source = iter(items)
    error: Optional[Exception] = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=WORKER_THREAD_PREFIX) as pool:
        try:
            while True:
                try:
                    item = next(source)
                except StopIteration:
                    break
                except Exception as e:  # raised after the results of the items before it
                    error = e
                    break
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
    if error is not None:
        raise error
