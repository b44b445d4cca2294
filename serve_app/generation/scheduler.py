"""The decode loop of a generator replica: continuous (iteration-level) batching.

One thread owns the model forward passes. Each loaded model has one running `DecodeBatch`;
requests are admitted at the next step boundary (up to `max_batch_size` rows) instead of waiting
for the batch in flight to finish, and each request is answered the moment its own row is done.
So batches stay full under load, a lone request starts at once, and a short request never
waits for a long neighbour.

Why not `@serve.batch` alone: it closes a batch when its wait timeout passes and queues it
behind the one running, so under load batches stay small and everyone waits for the longest
row. Here `@serve.batch` only groups arrivals for admission. No Ray import: unit tests drive it.

Every submitted request is answered, also when something unexpected fails: a request that
cannot be prepared or prefilled fails alone, a failing step fails its batch, and if the thread
itself dies it fails everything it holds and refuses new work (`alive` turns false, so the
replica's health check fails and Ray replaces it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from serve_app.domain import Generation, GenerationRequest, TextDelta
from serve_app.errors import GenerationFailedError, GeneratorUnavailableError

if TYPE_CHECKING:
    from serve_app.generation.engine import BatchDecoder, DecodeBatch
    from serve_app.generation.threads import ThreadBudget

logger = logging.getLogger("ray.serve").getChild(__name__)


class InjectedCrash(BaseException):
    """Ends the decode thread as an unexpected crash would (tests of health and recovery)."""


class SchedulerObserver(Protocol):
    """Receives what metrics need; called on the decode thread, so it must be cheap."""

    def admitted(self, model_id: str, queue_wait_s: float, prompt_tokens: int) -> None: ...

    def stepped(self, model_id: str, rows: int, seconds: float) -> None: ...

    def finished(self, model_id: str, completion_tokens: int) -> None: ...

    def occupancy(self, running: int, waiting: int) -> None: ...


@dataclass
class _Job:
    decoder: BatchDecoder
    request: GenerationRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    handed_over: bool = False  # given to `_start`, which answers it from then on
    streamed_text: bool = False  # some text has been sent (the first goes at once)
    slot: int = 0  # spreads the steps streams send on
    channel: asyncio.Queue | None = None  # streamed: TextDelta items, then the outcome


@dataclass
class SchedulerStats:
    admitted: int = 0
    prefills: int = 0  # admission groups (one prefill forward pass each)
    steps: int = 0
    step_rows: int = 0
    max_rows: int = 0
    tokens: int = 0
    queue_wait_s: float = 0.0
    step_s: float = 0.0  # decode steps (forward passes)
    admit_s: float = 0.0  # admissions: tokenising, prefill, merging into the batch
    idle_s: float = 0.0  # nothing to decode

    def snapshot(self) -> dict[str, float | int]:
        return {
            "admitted_requests": self.admitted,
            "prefills": self.prefills,
            "decode_steps": self.steps,
            "mean_rows_per_step": round(self.step_rows / self.steps, 2) if self.steps else 0.0,
            "max_rows_per_step": self.max_rows,
            "tokens_generated": self.tokens,
            "mean_queue_wait_ms": round(1000 * self.queue_wait_s / self.admitted, 2)
            if self.admitted
            else 0.0,
            "busy_step_s": round(self.step_s, 3),
            "busy_admit_s": round(self.admit_s, 3),
            "idle_s": round(self.idle_s, 3),
        }


class Scheduler:
    def __init__(
        self,
        max_batch_size: int,
        observer: SchedulerObserver | None = None,
        admit_min_rows: int = 1,
        admit_max_wait_s: float = 0.0,
        threads: ThreadBudget | None = None,
        crash_marker: str | None = None,
        niceness: int = 0,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.niceness = niceness  # added to the decode thread's (threads.lower_priority)
        self.crash_marker = crash_marker  # testing only (GeneratorOptions.crash_marker)
        self.admit_min_rows = admit_min_rows
        self.admit_max_wait_s = admit_max_wait_s
        self.threads = threads  # None: leave torch's thread count alone
        self.stream_messages_per_step = 8  # see BatchingConfig
        self._slots = itertools.count()
        self._occupancy = (0, 0)  # (running, waiting) as last told to the observer
        self.observer = observer
        self.stats = SchedulerStats()
        self._pending: deque[_Job] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._running: dict[int, tuple[DecodeBatch, dict[int, _Job]]] = {}
        self._prefilling = 0  # rows in a prefill now: started, though in no batch yet
        self._dead = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()

    # -- event-loop side --------------------------------------------------------------------
    def submit(
        self, decoder: BatchDecoder, requests: list[GenerationRequest]
    ) -> list[asyncio.Future]:
        """Queue requests for `decoder`'s model; each future resolves when its row is done."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(decoder, r, loop.create_future(), loop) for r in requests]
        self._enqueue(jobs)
        return [job.future for job in jobs]

    def submit_stream(
        self, decoder: BatchDecoder, request: GenerationRequest
    ) -> tuple[asyncio.Queue, asyncio.Future]:
        """Queue a streamed request. The queue receives `TextDelta`s as text is decoded, then
        the final `Generation` (or the exception); cancel the future to stop the row."""
        loop = asyncio.get_running_loop()
        job = _Job(decoder, request, loop.create_future(), loop, channel=asyncio.Queue())
        self._enqueue([job])
        return job.channel, job.future

    def _enqueue(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.slot = next(self._slots)
        with self._lock:
            if self._dead:
                raise GeneratorUnavailableError("the generator's decode loop has stopped")
            self._pending.extend(jobs)
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the decode thread (the replica shuts down); whatever it still holds fails."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)

    @property
    def alive(self) -> bool:
        """The decode thread runs, so every request submitted will be answered."""
        return self._thread.is_alive() and not self._dead

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def active(self) -> int:
        """Rows decoding now (read from another thread: a momentary figure)."""
        return sum(len(batch) for batch, _ in list(self._running.values()))

    @property
    def started(self) -> int:
        """Rows decoding or in their prefill now: what admission control must not count as
        waiting. Between a batch finishing and its successors' prefill ending no row decodes,
        yet nothing waits (a momentary figure, read from another thread)."""
        return self.active + self._prefilling

    # -- decode thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        if self.niceness:  # before any torch work: its OpenMP team inherits it
            from serve_app.generation.threads import lower_priority

            logger.info("decode thread niceness: %s", lower_priority(self.niceness))
        try:
            while not self._stopping:
                self._wake.clear()
                started = time.perf_counter()
                self._admit()
                self.stats.admit_s += time.perf_counter() - started
                active = [entry for entry in self._running.values() if entry[0].rows]
                occupancy = (sum(len(b) for b, _ in active), len(self._pending))
                if occupancy != self._occupancy:
                    self._occupancy = occupancy
                    self._notify("occupancy", *occupancy)
                if not active:
                    started = time.perf_counter()
                    self._wake.wait(timeout=1.0)
                    self.stats.idle_s += time.perf_counter() - started
                    continue
                for batch, jobs in active:
                    try:
                        self._step(batch, jobs)
                    except Exception:  # a bug must fail its requests, never the thread
                        logger.exception("decode step failed; failing %d requests", len(jobs))
                        for job in jobs.values():
                            _resolve(job, GenerationFailedError("generation failed"))
                        jobs.clear()
                        batch.drop(list(batch.rows))
                # An idle batch holds its model: forget it so an evicted model can be freed.
                for key in [k for k, (b, _) in self._running.items() if not b.rows]:
                    del self._running[key]
        except BaseException:
            logger.exception("the decode loop stopped")
            raise
        finally:
            self._fail_everything()

    def _fail_everything(self) -> None:
        """The thread is ending: answer every request it holds, and refuse new ones."""
        with self._lock:
            self._dead = True
            jobs = list(self._pending)
            self._pending.clear()
        for _, running in self._running.values():
            jobs.extend(running.values())
        for job in jobs:
            _resolve(job, GeneratorUnavailableError("the generator's decode loop has stopped"))

    def _admit(self) -> None:
        """Move pending jobs into their model's batch while it has room.

        A prefill stalls every running row of its model for a forward pass. So a model decoding
        at least `admit_min_rows` rows takes newcomers in groups (at least `admit_min_rows`, or
        as many as fit, or whatever has waited `admit_max_wait_s`): prefilling arrivals one by
        one would spend its decode budget on weight reads. A model with fewer rows (or none)
        takes newcomers at the next step: stalling a few rows costs little, and holding
        arrivals would leave the batch part-empty while they wait.
        """
        with self._lock:
            if not self._pending:
                return
            waiting, self._pending = self._pending, deque()
        try:
            held = self._place(waiting)
        except Exception:
            # `_start` answers the jobs it was handed; nothing else may be left unanswered.
            logger.exception("admitting %d requests failed", len(waiting))
            for job in waiting:
                if not job.handed_over:
                    _resolve(job, GenerationFailedError("generation failed"))
            return
        except BaseException:
            # The thread is dying mid-admission: these jobs are in no queue and no batch that
            # `_fail_everything` will see, so answer them here (a settled future is skipped).
            for job in waiting:
                _resolve(job, GeneratorUnavailableError("the generator's decode loop has stopped"))
            raise
        if held:
            held.sort(key=lambda j: j.submitted)
            with self._lock:
                self._pending.extendleft(reversed(held))  # keep arrival order

    def _place(self, waiting: deque[_Job]) -> list[_Job]:
        """Start what fits now; returns the jobs to hold for a later step."""
        now = time.perf_counter()
        by_model: dict[int, list[_Job]] = {}
        for job in waiting:
            if not job.future.cancelled():
                by_model.setdefault(id(job.decoder), []).append(job)
        held: list[_Job] = []
        for key, jobs in by_model.items():
            batch = self._batch_for(jobs[0].decoder)
            room = self.max_batch_size - len(batch)
            enough = min(self.admit_min_rows, room)
            overdue = now - jobs[0].submitted >= self.admit_max_wait_s
            busy = len(batch) >= self.admit_min_rows  # a stall would cost many rows a step
            if room <= 0 or (busy and len(jobs) < enough and not overdue):
                held.extend(jobs)
                continue
            held.extend(jobs[room:])
            self._start(batch, self._running[key][1], jobs[:room])
        return held

    def _start(self, batch: DecodeBatch, running: dict[int, _Job], jobs: list[_Job]) -> None:
        """Prefill `jobs` into `batch`; every job is answered from here on, whatever fails."""
        for job in jobs:
            job.handed_over = True
            if self.crash_marker and self.crash_marker in job.request.prompt:
                raise InjectedCrash("the decode thread was told to crash")
        now = time.perf_counter()
        self._prefilling = len(jobs)
        try:
            if self.threads:
                self.threads.for_prefill()
            rows, errors = jobs[0].decoder.prepare([j.request for j in jobs])
            for i, exc in errors.items():
                _resolve(jobs[i], exc)
            batch.admit(rows)  # all rows or none
        except Exception:
            logger.exception("prefill failed for %d requests", len(jobs))
            for job in jobs:
                _resolve(job, GenerationFailedError("generation failed"))
            return
        finally:
            self._prefilling = 0
        for row in rows:
            job = jobs[row.index]
            job.admitted = now
            running[id(row)] = job
            wait = now - job.submitted
            self.stats.admitted += 1
            self.stats.queue_wait_s += wait
            self._notify("admitted", job.request.model, wait, len(row.prompt_ids))
        if rows:
            self.stats.prefills += 1

    def _notify(self, event: str, *args: object) -> None:
        """Tell the observer (metrics): its failure is logged, never a request's failure."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, event)(*args)
        except Exception:
            logger.exception("scheduler observer failed on %s", event)

    def _batch_for(self, decoder: BatchDecoder) -> DecodeBatch:
        from serve_app.generation.engine import DecodeBatch

        entry = self._running.get(id(decoder))
        if entry is None or entry[0].decoder is not decoder:
            entry = (DecodeBatch(decoder), {})
            self._running[id(decoder)] = entry
        return entry[0]

    def _step(self, batch: DecodeBatch, jobs: dict[int, _Job]) -> None:
        gone = [row for row in batch.rows if jobs[id(row)].future.cancelled()]
        if gone:
            batch.drop(gone)
            for row in gone:
                jobs.pop(id(row))
            if not batch.rows:
                return
        rows = list(batch.rows)
        if self.threads:
            self.threads.for_step(len(rows))
        model_id = jobs[id(rows[0])].request.model
        started = time.perf_counter()
        batch.step(lambda: self._deliver(rows, jobs, model_id))
        elapsed = time.perf_counter() - started
        self.stats.step_s += elapsed
        self.stats.steps += 1
        self.stats.step_rows += len(rows)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        self._notify("stepped", model_id, len(rows), elapsed)

    def _deliver(self, rows: list, jobs: dict[int, _Job], model_id: str) -> None:
        """Answer the rows that finished and stream new text, before the next forward pass.

        With more streams than `stream_messages_per_step`, a stream sends every `every` steps
        (its first text and its end at once): the messages per step stay bounded."""
        streams = sum(jobs[id(r)].channel is not None for r in rows)
        every = max(1, -(-streams // self.stream_messages_per_step))  # ceil, at least 1
        step = self.stats.steps
        for row in rows:
            if row.finish is None:
                job = jobs[id(row)]
                due = not job.streamed_text or (step + job.slot) % every == 0
                if job.channel is not None and due:
                    job.streamed_text |= _send(
                        job, row.text.take(), len(row.tokens), len(row.prompt_ids)
                    )
                continue
            job = jobs.pop(id(row))
            result = job.decoder.result(job.request, row)
            self.stats.tokens += result.completion_tokens
            self._notify("finished", model_id, result.completion_tokens)
            if job.channel is not None:
                _send(job, row.text.take(), len(row.tokens), len(row.prompt_ids))
            _resolve(job, result)


def _send(job: _Job, text: str, completion_tokens: int, prompt_tokens: int) -> bool:
    """Hand a streamed job the text decoded since the last delta; False: there was none."""
    if not text:
        return False
    delta = TextDelta(text, completion_tokens, prompt_tokens)
    job.loop.call_soon_threadsafe(job.channel.put_nowait, delta)
    return True


def _resolve(job: _Job, outcome: Generation | BaseException) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
        if job.channel is not None:
            job.channel.put_nowait(outcome)

    job.loop.call_soon_threadsafe(settle)
