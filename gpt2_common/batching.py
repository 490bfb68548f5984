"""Requests decoded together (serve.py): one thread, the decode loop, owns the model; the HTTP handlers hand it
jobs and read each job's events from a queue of their own.

A job is one request: one row or more (OpenAI's `n` and lists of prompts), each with its prompt, its sampling
settings, its token limit and its stop strings. The loop decodes the rows of every job it holds as one batched
generation (either framework's RowBatch, through `start(prompts, sampling)`), one token a step, sending each row's
text to its job as it comes. A row ends at <|endoftext|>, at a stop string, at its token limit, when its job is
cancelled (the client left) or runs past its time limit; its row is then freed in the batch. Jobs that arrive while
a batch runs join it at the next step where there is room (`max_batch` rows; first come, first served), so that a
client never waits for another's long completion to end while the machine could decode both; the others wait. Past
`max_queue` waiting jobs a new one is refused (QueueFull), so that a crowd gets an answer, not an ever longer wait.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from gpt2_common.faults import warn
from gpt2_common.tokenizer import EOT_TOKEN, get_tokenizer


@dataclass(frozen=True)
class Sampling:
    """How a row draws its tokens (the samplers' per-row settings)."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    sample: int = 0  # the row's index among the samples of its seed: a request's n choices draw differently


@dataclass
class Row:
    """One completion that a client waits for."""

    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...] = ()
    tokens: int = 0  # drawn so far (a stop string's tokens included, <|endoftext|> not)


class QueueFull(Exception):
    """More jobs wait than the server takes (max_queue)."""


class TooLong(Exception):
    """A job waited or ran past its time limit."""


class Job:
    """A request's rows and the queue its handler reads. Events, in order for each row: ("text", row, text) any
    number of times, then ("finish", row, "stop" | "length"); or, for the whole job, ("error", exception) once."""

    def __init__(self, rows: Sequence[Row], loop: asyncio.AbstractEventLoop, timeout: float):
        self.rows = list(rows)
        self.events: asyncio.Queue = asyncio.Queue()
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.cancelled = False  # set by the handler when its client leaves; read by the decode loop
        self.loop = loop
        self.held: list[tuple] = []  # events sent and not yet posted (the decode loop's thread only)

    def send(self, *event: Any) -> None:
        """From the decode loop's thread: an event for the handler, handed over at the next post()."""
        self.held.append(event)

    def cancel(self) -> None:
        self.cancelled = True

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


def post(jobs) -> None:
    """Hands the jobs' held events to their handlers, from the decode loop's thread: one wake-up of each event loop
    a step, where a wake-up per event (16 rows, 16 a step) cost the server more than the step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Job]] = collections.defaultdict(list)
    for job in jobs:
        if job.held:
            by_loop[job.loop].append(job)
    for loop, ready in by_loop.items():
        delivery = [(job, job.held) for job in ready]
        for job in ready:
            job.held = []
        try:
            loop.call_soon_threadsafe(_deliver, delivery)
        except RuntimeError:  # the handlers' event loop has closed: no one is listening
            for job in ready:
                job.cancelled = True


def _deliver(delivery) -> None:
    for job, events in delivery:
        for event in events:
            job.events.put_nowait(event)


class RowText:
    """A row's tokens as text: a character split over tokens waits for its last byte (bytes that can never be UTF-8
    become U+FFFD, as tokenizer.decode does), and text that may be the start of a stop string waits until it is
    known not to be one; a stop string ends the row, and neither it nor anything after it is sent."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""

    def add(self, piece: bytes, final: bool = False) -> tuple[str, bool]:
        """(the text that may be sent now, whether a stop string ended the row)."""
        text = self.held + self.utf8.decode(piece, final=final)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.held = ""
            return text[:min(found)], True
        keep = 0 if final else max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


@dataclass
class _Live:
    job: Job
    index: int  # the row's index in its job
    text: RowText = field(default=None)


class Batcher:
    """The decode loop: a thread that takes the waiting jobs, decodes their rows together, lets the jobs that come
    meanwhile join, and does it again. `start(prompts, sampling)` begins a batch (a RowBatch: `.rows`, `.step()`,
    `.add(prompts, sampling)`, `.free(rows)`)."""

    def __init__(self, start: Callable, max_batch: int, max_queue: int, stop_token: int | None = EOT_TOKEN):
        self.start, self.max_batch, self.max_queue, self.stop_token = start, max_batch, max_queue, stop_token
        self.waiting: collections.deque[Job] = collections.deque()
        self.decoding = 0  # rows in the running batch, for /health and tests
        self.batches = 0  # batches run so far
        self._ready = threading.Condition()
        self._live: dict[int, _Live] = {}  # the running batch's rows by name (the decode loop's thread only)
        self._tokenizer = get_tokenizer()
        self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues a job, or raises QueueFull. A job of more rows than max_batch is the caller's to refuse first."""
        with self._ready:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues")
            self.waiting.append(job)
            self._ready.notify()

    def idle(self) -> bool:
        with self._ready:
            return not self.waiting and self.decoding == 0

    # --- the decode loop's thread ---------------------------------------------------------------------------------

    def _next_jobs(self, room: int, wait: bool = True) -> list[Job]:
        """The waiting jobs that fit `room` rows, first come first served (with `wait`, blocks until there is one)."""
        with self._ready:
            while wait and not self.waiting:
                self._ready.wait()
            jobs, rows = [], 0
            while self.waiting and rows + len(self.waiting[0].rows) <= room:
                job = self.waiting.popleft()
                if job.cancelled:
                    continue
                if job.expired():
                    job.send("error", TooLong(f"it waited longer than this server's limit of {job.timeout:g} s a "
                                              "request"))
                    post([job])
                    continue
                jobs.append(job)
                rows += len(job.rows)
            if wait and not jobs and self.waiting:  # larger than a batch: the handler refuses those, but never stall
                job = self.waiting.popleft()
                job.send("error", ValueError(f"{len(job.rows)} completions, more than {self.max_batch} a batch"))
                post([job])
            self.decoding += rows
            return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._next_jobs(self.max_batch)
            if jobs:
                try:
                    self._run(jobs)
                except Exception as err:  # the model or the sampler failed: its jobs say so, the server serves on
                    lines = str(err).strip().splitlines()
                    warn(f"generation failed: {type(err).__name__}" + (f": {lines[0][:300]}" if lines else ""))
                    failed = set(jobs) | {row.job for row in self._live.values()}  # those that joined too
                    for job in failed:
                        job.send("error", err)
                    post(failed)
                finally:
                    with self._ready:
                        self.decoding = 0
                        self.batches += 1

    def _run(self, jobs: list[Job]) -> None:
        live = self._live = {}  # the batch's rows by name

        def admit(jobs: list[Job], batch=None):
            rows = [_Live(job, i, RowText(row.stop)) for job in jobs for i, row in enumerate(job.rows)]
            prompts, sampling = [r.job.rows[r.index].prompt for r in rows], [r.job.rows[r.index].sampling for r in rows]
            if batch is None:
                batch = self.start(prompts, sampling)
                names = list(batch.rows)
            else:
                names = batch.add(prompts, sampling)
            live.update(zip(names, rows))
            return batch

        batch = admit(jobs)
        while batch.rows:
            tokens = batch.step()
            done = []
            for name, token in zip(list(batch.rows), tokens):
                if self._advance(live[name], token):
                    done.append(name)
            for name in batch.rows:  # cancelled or expired jobs free all their rows
                if name not in done and self._gone(live[name]):
                    done.append(name)
            batch.free(done)
            post({row.job for row in live.values()})
            for name in done:
                del live[name]
            self.decoding = len(batch.rows)
            if batch.rows:  # the jobs that came meanwhile join, where there is room (else a new batch begins)
                joining = self._next_jobs(self.max_batch - len(batch.rows), wait=False)
                if joining:
                    admit(joining, batch)

    def _gone(self, row: _Live) -> bool:
        if row.job.cancelled:
            return True
        if row.job.expired():
            row.job.cancel()
            row.job.send("error", TooLong(f"it ran longer than this server's limit of {row.job.timeout:g} s a "
                                          "request"))
            return True
        return False

    def _advance(self, row: _Live, token: int) -> bool:
        """Takes a row's next token; True when the row is over."""
        if self._gone(row):
            return True
        spec = row.job.rows[row.index]
        if token == self.stop_token:
            text, _ = row.text.add(b"", final=True)
            return self._finish(row, text, "stop")
        spec.tokens += 1
        text, stopped = row.text.add(self._tokenizer.decode_single_token_bytes(token))
        if stopped:
            return self._finish(row, text, "stop")
        if spec.tokens >= spec.max_tokens:
            tail, stopped = row.text.add(b"", final=True)
            return self._finish(row, text + tail, "stop" if stopped else "length")
        if text:
            row.job.send("text", row.index, text)
        return False

    @staticmethod
    def _finish(row: _Live, text: str, reason: str) -> bool:
        if text:
            row.job.send("text", row.index, text)
        row.job.send("finish", row.index, reason)
        return True
