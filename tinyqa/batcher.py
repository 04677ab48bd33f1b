"""One thread runs the model for every request of the server: concurrent requests' windows go through it
together, a budget of tokens at a time, and no large request can starve a small one.

Each request thread featurizes its own questions, hands its windows to `Batcher.run` and waits; the model
thread collects for `wait_s` after the first window arrives (or until `max_tokens` are waiting), runs them
as one forward pass of run_model (length-sorted, padded per batch), and routes each window's logits back;
the request thread then decodes its own answers. A pass holds at most `request_tokens` for each request in
it, and `max_tokens` in all. Requests that have not been served yet go first, in a pass of their own: many
small requests share long passes, which run nearer the peak. Requests under way share the others,
least-served first, one window each in turn; a long request alone thus runs in short passes, so that a
one-question request arriving during a thousand-question one waits for little more than one of them, then
runs without the long one's windows. After a few passes of newcomers only, the others get one, so a stream
of small requests cannot starve a large one.

Why this pays on a CPU, where a forward pass already keeps both cores busy: a question alone is one short
window, whose matmuls run well under the machine's peak; several in one pass run near it. And the request
threads tokenize, decode and talk HTTP while the model runs. On a GPU the same batching matters more (a
pass of one window leaves most of the device idle), with a larger token budget.
"""
import threading
import time
from collections import deque

from .infer import run_model


class _Job:
    def __init__(self, features):
        self.features, self.waiting = features, deque(range(len(features)))
        self.starts, self.ends = [None] * len(features), [None] * len(features)
        self.served, self.done, self.error = 0, threading.Event(), None


class Batcher:
    def __init__(self, model, max_tokens, request_tokens, wait_s=0.002, batch_size=64, device="cpu", on_pass=None):
        # max_tokens, request_tokens: no defaults here; the server chooses them per device (make_server)
        self.model, self.max_tokens, self.request_tokens, self.wait_s = model, max_tokens, request_tokens, wait_s
        self.batch_size, self.device, self.on_pass = batch_size, device, on_pass  # on_pass(windows, tokens, s)
        self.jobs, self.cond, self.stopping, self.fresh_passes = [], threading.Condition(), False, 0
        self.thread = threading.Thread(target=self._loop, name="tinyqa-batcher", daemon=True)
        self.thread.start()

    def run(self, features):
        """(start logits, end logits) of each feature, computed with other requests' windows: a request
        thread's `runner` (QuestionAnswerer.runner). Blocks until all of them are done."""
        if not features:
            return [], []
        job = _Job(features)
        with self.cond:
            if self.stopping:
                raise RuntimeError("the server is shutting down")
            self.jobs.append(job)
            self.cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.starts, job.ends

    @property
    def queued(self) -> int:
        """Windows waiting for the model (for /metrics)."""
        with self.cond:
            return sum(len(j.waiting) for j in self.jobs)

    def stop(self):
        """Finish every window handed in, then end the model thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def _loop(self):
        while True:
            with self.cond:
                while not self.jobs and not self.stopping:
                    self.cond.wait()
                if not self.jobs:
                    return
            time.sleep(self.wait_s)  # let concurrent requests join this pass
            with self.cond:
                picked = self._pick()
            self._run(picked)

    # passes of newcomers only in a row, before the requests already under way get one
    FRESH_PASSES = 4

    def _pick(self):
        """[(job, window index)] for the next pass (at least one window): the newcomers alone, or every
        request, least-served first, one window each in turn; request_tokens a request, max_tokens in all."""
        fresh = [j for j in self.jobs if j.served == 0]
        if fresh and self.fresh_passes < self.FRESH_PASSES:
            order, self.fresh_passes = fresh, self.fresh_passes + 1
        else:
            order, self.fresh_passes = sorted(self.jobs, key=lambda j: j.served), 0
        budget = min(self.max_tokens, self.request_tokens * len(order))
        picked, tokens = [], 0
        while any(j.waiting for j in order):
            for job in order:
                if not job.waiting:
                    continue
                n = len(job.features[job.waiting[0]].input_ids)
                if picked and tokens + n > budget:
                    return picked
                picked.append((job, job.waiting.popleft()))
                job.served += n
                tokens += n
        return picked

    def _run(self, picked):
        t = time.perf_counter()
        try:
            starts, ends = run_model(self.model, [job.features[i] for job, i in picked], self.batch_size, self.device)
        except Exception as e:  # handed to every request of the pass; the server answers them with a 500
            starts = ends = None
            for job, _ in picked:
                job.error = e
        finished = set()
        with self.cond:
            for k, (job, i) in enumerate(picked):
                if starts is not None:
                    job.starts[i], job.ends[i] = starts[k], ends[k]
                if job.error is not None or (not job.waiting and all(s is not None for s in job.starts)):
                    finished.add(job)
            self.jobs = [j for j in self.jobs if j not in finished]
        for job in finished:
            job.done.set()
        if self.on_pass:
            self.on_pass(len(picked), sum(len(job.features[i].input_ids) for job, i in picked),
                         time.perf_counter() - t)
