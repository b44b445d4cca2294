"""The continuous-batching decode loop, driven from asyncio as the generator replica drives it,
on real tiny GPT-2 stand-ins."""

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from serve_app.config import ModelSpec
from serve_app.domain import Generation, GenerationRequest, SamplingParams, TextDelta
from serve_app.errors import GenerationFailedError, GeneratorUnavailableError, PromptTooLongError
from serve_app.generation.engine import BatchDecoder
from serve_app.generation.scheduler import Scheduler
from serve_app.generation.threads import ThreadBudget, lower_priority, torch_side_executor
from serve_app.models.loading import load_model
from serve_app.models.resolve import resolve_model
from tests.unit.generation import decoding


def _decoder(root, seed: int, model_id: str) -> BatchDecoder:
    spec = ModelSpec(id=model_id, architecture="tiny", seed=seed)
    return BatchDecoder(load_model(spec, resolve_model(spec, root, 1.0, True), root))


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    return _decoder(root, 1, "m1"), _decoder(root, 2, "m2")


@pytest.fixture
def scheduler():
    s = Scheduler(max_batch_size=4)
    yield s
    s.stop()


def req(prompt: str, model: str = "m1", **params) -> GenerationRequest:
    return GenerationRequest(model, prompt, SamplingParams(**params))


async def until(predicate, timeout_s: float = 30.0) -> None:
    """Wait for the decode thread's progress (a thread, so no asyncio.Event to await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "decode loop made no progress"
        await asyncio.sleep(0.005)


async def running_batch(s: Scheduler, decoder: BatchDecoder, rows: int) -> list[asyncio.Future]:
    """`rows` long requests, decoding together by the time this returns."""
    futures = s.submit(decoder, [req(f"long one {i}", max_new_tokens=500) for i in range(rows)])
    await until(lambda: s.stats.steps >= 2)
    return futures


def lone(decoder: BatchDecoder, request: GenerationRequest) -> str:
    return decoding.lone(decoder, request).completion


async def test_concurrent_requests_match_lone_results_and_respect_the_cap(decoders, scheduler):
    d1, _ = decoders
    requests = [req(f"prompt number {i}", max_new_tokens=5 + i) for i in range(10)]
    requests.append(req("sampled", temperature=1.1, top_p=0.9, seed=4, max_new_tokens=9))
    futures = scheduler.submit(d1, requests)
    results = await asyncio.gather(*futures)
    for request, result in zip(requests, results, strict=True):
        assert isinstance(result, Generation)
        assert result.completion == lone(d1, request)
    assert 1 < scheduler.stats.max_rows <= 4
    assert scheduler.stats.admitted == len(requests)


async def test_a_late_short_request_does_not_wait_for_a_long_one(decoders, scheduler):
    d1, _ = decoders
    (long_future,) = scheduler.submit(d1, [req("a long story", max_new_tokens=200)])
    await until(lambda: scheduler.stats.steps >= 5)
    (short_future,) = scheduler.submit(d1, [req("quick", max_new_tokens=2)])
    short = await short_future
    assert not long_future.done()  # admitted mid-flight and answered first
    assert short.completion == lone(d1, req("quick", max_new_tokens=2))
    assert (await long_future).completion_tokens == 200


async def test_errors_resolve_only_their_own_request(decoders, scheduler):
    d1, _ = decoders
    ok, bad = scheduler.submit(d1, [req("fine", max_new_tokens=3), req("word " * 600)])
    assert isinstance(await ok, Generation)
    with pytest.raises(PromptTooLongError):
        await bad


async def test_a_request_that_fails_unexpectedly_fails_alone(decoders, scheduler, monkeypatch):
    """A failure that is no ServeError while preparing a request (here the tokenizer) fails
    that request; the decode thread lives on and serves the next one."""
    d1, _ = decoders
    real_encode = d1.tokenizer.encode

    def encode(text, **kwargs):
        if text == "boom":
            raise RuntimeError("tokenizer crashed")
        return real_encode(text, **kwargs)

    monkeypatch.setattr(d1.tokenizer, "encode", encode)
    bad, ok = scheduler.submit(d1, [req("boom"), req("fine", max_new_tokens=3)])
    with pytest.raises(GenerationFailedError):
        await asyncio.wait_for(bad, 30)
    assert (await asyncio.wait_for(ok, 30)).completion_tokens == 3
    (later,) = scheduler.submit(d1, [req("later", max_new_tokens=2)])
    assert (await asyncio.wait_for(later, 30)).completion_tokens == 2
    assert scheduler.alive


async def test_a_failing_observer_fails_no_request(decoders):
    class Broken:
        def admitted(self, *args: object) -> None:
            raise RuntimeError("metrics backend down")

        stepped = finished = occupancy = admitted

    d1, _ = decoders
    s = Scheduler(max_batch_size=4, observer=Broken())
    try:
        (future,) = s.submit(d1, [req("fine", max_new_tokens=3)])
        assert (await asyncio.wait_for(future, 30)).completion_tokens == 3
        assert s.alive
    finally:
        s.stop()


class _Die(BaseException):
    """Something no handler should swallow: it ends the decode thread."""


async def test_a_dead_decode_loop_answers_what_it_held_and_refuses_more(decoders, monkeypatch):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is the point
    d1, _ = decoders
    s = Scheduler(max_batch_size=4)
    long_futures = await running_batch(s, d1, 2)

    def die(*args: object) -> None:
        raise _Die

    monkeypatch.setattr(s, "_step", die)
    for future in long_futures:
        with pytest.raises(GeneratorUnavailableError) as err:
            await asyncio.wait_for(future, 30)
        assert err.value.status_code == 503  # at once, not a hang; Ray replaces the replica
    await until(lambda: not s.alive)
    with pytest.raises(GeneratorUnavailableError):
        s.submit(d1, [req("too late")])


async def test_a_crash_while_admitting_answers_the_admitted_and_the_running(decoders, monkeypatch):
    """The crash marker (a test hook) kills the thread inside an admission: the jobs of that
    admission are in no queue and no batch, and are answered all the same."""
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    d1, _ = decoders
    s = Scheduler(max_batch_size=8, crash_marker="crash-marker-0")
    running = await running_batch(s, d1, 2)
    doomed = s.submit(d1, [req("fine"), req("a crash-marker-0 here"), req("also fine")])
    for future in [*running, *doomed]:
        with pytest.raises(GeneratorUnavailableError):
            await asyncio.wait_for(future, 30)
    await until(lambda: not s.alive)


async def test_rows_in_their_prefill_count_as_started_not_waiting(decoders, monkeypatch):
    """Admission control refuses on what waits (submitted, not started). While a finished
    batch's successors are in their prefill no row decodes, yet none of them waits."""
    d1, _ = decoders
    entered, release = threading.Event(), threading.Event()
    prepare = d1.prepare

    def slow_prepare(requests):
        entered.set()
        release.wait(30)
        return prepare(requests)

    monkeypatch.setattr(d1, "prepare", slow_prepare)
    s = Scheduler(max_batch_size=4)
    try:
        futures = s.submit(d1, [req(f"prompt {i}", max_new_tokens=3) for i in range(6)])
        await until(entered.is_set)
        assert (s.active, s.started) == (0, 4)
        release.set()
        await asyncio.gather(*futures)
        assert s.started == 0
    finally:
        release.set()
        s.stop()


async def collect(channel: asyncio.Queue) -> tuple[list[TextDelta], Generation]:
    deltas = []
    while True:
        item = await asyncio.wait_for(channel.get(), 30)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Generation):
            return deltas, item
        deltas.append(item)


async def test_a_streamed_request_shares_the_batch_and_its_deltas_make_the_text(
    decoders, scheduler
):
    d1, _ = decoders
    plain = req("side by side", max_new_tokens=12)
    streamed = GenerationRequest(
        "m1", "side by side", SamplingParams(max_new_tokens=12), stream=True
    )
    (future,) = scheduler.submit(d1, [plain])
    channel, _ = scheduler.submit_stream(d1, streamed)
    deltas, final = await collect(channel)
    assert "".join(d.text for d in deltas) == final.completion == (await future).completion
    assert len(deltas) > 1  # text arrived as it was decoded, not at the end
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts) and counts[-1] <= final.completion_tokens
    assert scheduler.stats.max_rows == 2  # one batch for both


async def test_many_streams_send_every_few_steps_and_lose_no_text(decoders):
    d1, _ = decoders
    s = Scheduler(max_batch_size=8)
    s.stream_messages_per_step = 2  # 6 streams: each sends every third step
    try:
        requests = [
            GenerationRequest("m1", f"stream {i}", SamplingParams(max_new_tokens=18), stream=True)
            for i in range(6)
        ]
        outcomes = await asyncio.gather(*(collect(s.submit_stream(d1, r)[0]) for r in requests))
    finally:
        s.stop()
    for request, (deltas, final) in zip(requests, outcomes, strict=True):
        assert "".join(d.text for d in deltas) == final.completion == lone(d1, request)
        assert 2 <= len(deltas) <= final.completion_tokens // 2  # fewer messages than tokens


async def test_a_streamed_stop_string_is_never_sent(decoders, scheduler):
    d1, _ = decoders
    full = lone(d1, req("streamed stop", max_new_tokens=20))
    stop = full[5:8]
    request = GenerationRequest(
        "m1", "streamed stop", SamplingParams(max_new_tokens=20, stop=(stop,)), stream=True
    )
    deltas, final = await collect(scheduler.submit_stream(d1, request)[0])
    assert "".join(d.text for d in deltas) == final.completion == full[: full.index(stop)]
    assert final.finish_reason == "stop"


async def test_a_cancelled_stream_leaves_the_batch_within_a_step(decoders, scheduler):
    d1, _ = decoders
    request = GenerationRequest("m1", "go on", SamplingParams(max_new_tokens=400), stream=True)
    channel, future = scheduler.submit_stream(d1, request)
    await asyncio.wait_for(channel.get(), 30)
    future.cancel()
    await until(lambda: scheduler.active == 0)
    assert scheduler.stats.tokens == 0  # nothing finished: the row was dropped, not completed
    steps = scheduler.stats.steps
    await asyncio.sleep(0.1)
    assert scheduler.stats.steps == steps  # and nothing decodes any more


async def test_cancelled_request_leaves_the_batch(decoders, scheduler):
    d1, _ = decoders
    keep, drop = scheduler.submit(
        d1, [req("keep", max_new_tokens=30), req("drop", max_new_tokens=250)]
    )
    await until(lambda: scheduler.stats.steps >= 3)
    drop.cancel()
    await keep
    await asyncio.sleep(0.05)
    assert scheduler.stats.tokens < 30 + 250


async def test_two_models_decode_side_by_side(decoders, scheduler):
    d1, d2 = decoders
    r1 = req("same prompt", "m1", max_new_tokens=8)
    r2 = req("same prompt", "m2", max_new_tokens=8)
    a, b = await asyncio.gather(*scheduler.submit(d1, [r1]), *scheduler.submit(d2, [r2]))
    assert a.completion == lone(d1, r1) and b.completion == lone(d2, r2)
    assert a.completion != b.completion


async def test_capacity_changes_apply_live(decoders, scheduler):
    d1, _ = decoders
    scheduler.max_batch_size = 1
    await asyncio.gather(*scheduler.submit(d1, [req(f"p{i}", max_new_tokens=3) for i in range(3)]))
    assert scheduler.stats.max_rows == 1


async def test_newcomers_to_a_running_batch_are_prefilled_together(decoders):
    d1, _ = decoders
    s = Scheduler(max_batch_size=8, admit_min_rows=3, admit_max_wait_s=30.0)
    try:
        long_futures = await running_batch(s, d1, 3)
        assert s.stats.prefills == 1  # an idle model admits at once
        futures = []
        for i in range(3):  # arrive one by one while the batch runs
            futures += s.submit(d1, [req(f"newcomer {i}", max_new_tokens=2)])
            await asyncio.sleep(0.005)
        assert not any(f.done() for f in long_futures)  # they arrived while it ran
        results = await asyncio.gather(*futures)
        assert s.stats.prefills == 2  # the three joined in one prefill
        for i, r in enumerate(results):
            assert r.completion == lone(d1, req(f"newcomer {i}", max_new_tokens=2))
        assert not any(f.done() for f in long_futures)
    finally:
        s.stop()


async def test_a_held_newcomer_is_admitted_when_overdue(decoders):
    d1, _ = decoders
    s = Scheduler(max_batch_size=8, admit_min_rows=5, admit_max_wait_s=0.2)
    try:
        long_futures = await running_batch(s, d1, 5)
        (alone,) = s.submit(d1, [req("alone", max_new_tokens=2)])
        result = await alone
        assert result.completion_tokens == 2
        assert s.stats.queue_wait_s >= 0.2  # it was held for company, then let in
        assert not any(f.done() for f in long_futures)
    finally:
        s.stop()


async def test_a_small_running_batch_takes_a_newcomer_at_once(decoders):
    """Holding arrivals pays only when a prefill would stall many rows; below
    `admit_min_rows` running rows a newcomer joins at the next step."""
    d1, _ = decoders
    s = Scheduler(max_batch_size=8, admit_min_rows=5, admit_max_wait_s=30.0)
    try:
        (long_future,) = await running_batch(s, d1, 1)
        (newcomer,) = s.submit(d1, [req("newcomer", max_new_tokens=2)])
        result = await asyncio.wait_for(newcomer, 10)
        assert result.completion_tokens == 2
        assert s.stats.prefills == 2 and not long_future.done()
        assert s.stats.queue_wait_s < 5  # not held for the 30 s admit_max_wait_s
    finally:
        s.stop()


class _ThreadsSeen:
    """Observer that records, on the decode thread, the torch thread count each step ran with."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []  # (rows, threads)
        self.prefill_threads: list[int] = []

    def admitted(self, model_id: str, queue_wait_s: float, prompt_tokens: int) -> None:
        self.prefill_threads.append(torch.get_num_threads())

    def stepped(self, model_id: str, rows: int, seconds: float) -> None:
        self.steps.append((rows, torch.get_num_threads()))

    def finished(self, model_id: str, completion_tokens: int) -> None:
        pass

    def occupancy(self, running: int, waiting: int) -> None:
        pass


async def test_small_decode_steps_run_on_one_thread_and_the_rest_on_all(decoders):
    d1, _ = decoders
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # so the prefill has to raise it
    seen = _ThreadsSeen()
    s = Scheduler(max_batch_size=4, observer=seen, threads=ThreadBudget(2, 2))
    try:
        # Rows retire one by one (2, 4, 6, 8 tokens): steps at 4, 3, 2 and then 1 row.
        requests = [req(f"prompt {i}", max_new_tokens=2 * (i + 1)) for i in range(4)]
        results = await asyncio.gather(*s.submit(d1, requests))
    finally:
        s.stop()
        torch.set_num_threads(before)
    assert {rows for rows, _ in seen.steps} == {1, 2, 3, 4}
    assert all(threads == (1 if rows <= 2 else 2) for rows, threads in seen.steps), seen.steps
    assert seen.prefill_threads and set(seen.prefill_threads) == {2}  # prefills use them all
    for request, result in zip(requests, results, strict=True):
        assert result.completion == lone(d1, request)


def test_thread_budget_default_runs_every_step_on_every_thread():
    before = torch.get_num_threads()
    try:
        for rows in (1, 2, 4, 32):
            torch.set_num_threads(1)
            ThreadBudget(2).for_step(rows)  # single_thread_max_rows defaults to 0
            assert torch.get_num_threads() == 2, rows
        budget = ThreadBudget(2)
        budget.single_thread_max_rows = 4  # live, as reconfigure() sets it
        budget.for_step(4)
        assert torch.get_num_threads() == 1
        budget.for_step(5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _parallel_work() -> int:
    x = torch.randn(4_000_000)
    x.exp().sum()  # elementwise over 4M floats: split across torch's intra-op (OpenMP) threads
    return torch.get_num_threads()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_torch_side_thread_gets_no_openmp_team_of_its_own():
    """A thread beside the decode thread that runs torch on several threads gets an OpenMP
    team of its own for as long as it lives (so libgomp throttles every team's spinning: see
    threads.one_torch_thread); a `torch_side_executor` thread runs torch on one thread and
    starts no OpenMP worker."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _parallel_work()  # this thread's own team, if it had none yet
        base = _os_threads()
        with ThreadPoolExecutor(max_workers=1) as plain:  # the control: what the fix prevents
            assert plain.submit(_parallel_work).result() == 2
            plain_threads = _os_threads() - base
        torch.set_num_threads(2)
        with torch_side_executor("side") as side:
            assert side.submit(_parallel_work).result() == 1
            side_threads = _os_threads() - base
        assert plain_threads == 2, "the executor's thread and its OpenMP worker"
        assert side_threads == 1, "the executor's thread alone"
    finally:
        torch.set_num_threads(before)


def test_thread_budget_count_survives_another_thread_setting_one():
    """torch applies its process-wide count to a thread lazily, at that thread's first use. A
    side thread setting one thread (`one_torch_thread`) between the decode thread's first
    `ThreadBudget` call and its first forward pass must not leave the decode thread on one."""
    before = torch.get_num_threads()
    budget_set, side_done = threading.Event(), threading.Event()
    seen: list[int] = []

    def decode_thread() -> None:
        ThreadBudget(2).for_prefill()
        budget_set.set()
        side_done.wait(10)
        torch.randn(1000).exp()  # this thread's first torch op
        seen.append(torch.get_num_threads())

    try:
        decode = threading.Thread(target=decode_thread)
        decode.start()
        budget_set.wait(10)
        with torch_side_executor("side") as side:
            side.submit(torch.get_num_threads).result()
        side_done.set()
        decode.join(10)
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's"
)


def _niceness(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@linux_only
async def test_decode_thread_runs_nicer_by_the_configured_steps(decoders):
    d1, _ = decoders
    base = _niceness(threading.get_native_id())
    nicer, plain = Scheduler(max_batch_size=4, niceness=3), Scheduler(max_batch_size=4)
    try:
        for s in (nicer, plain):
            await asyncio.gather(*s.submit(d1, [req("a prompt", max_new_tokens=2)]))
        assert _niceness(nicer._thread.native_id) == min(19, base + 3)
        assert _niceness(plain._thread.native_id) == base
    finally:
        nicer.stop()
        plain.stop()
    assert _niceness(threading.get_native_id()) == base  # the caller's own is untouched


@linux_only
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads in /proc")
def test_openmp_team_of_a_nicer_thread_inherits_its_niceness():
    """The decode thread lowers its priority before its first torch work, so that the OpenMP
    workers doing most of each forward pass run at it too."""
    base = _niceness(threading.get_native_id())
    before_tids = set(os.listdir("/proc/self/task"))
    seen: dict[str, int] = {}

    def decode_thread() -> None:
        seen["set"] = lower_priority(2)
        torch.set_num_threads(2)
        _parallel_work()  # starts this thread's OpenMP team
        seen.update({t: _niceness(int(t)) for t in os.listdir("/proc/self/task")})

    before = torch.get_num_threads()
    try:
        thread = threading.Thread(target=decode_thread)
        thread.start()
        thread.join(30)
    finally:
        torch.set_num_threads(before)
    expected = min(19, base + 2)
    assert seen.pop("set") == expected
    started = {tid: nice for tid, nice in seen.items() if tid not in before_tids}
    assert len(started) >= 2, "the thread and its OpenMP worker"
    assert set(started.values()) == {expected}, started
    assert lower_priority(0) is None  # 0 leaves the caller alone
    assert _niceness(threading.get_native_id()) == base
