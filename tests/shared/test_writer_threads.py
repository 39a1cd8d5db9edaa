"""utils.pools.WriterThreads: the background writes of `vitpcm infer` (issue 11)."""

from __future__ import annotations

import threading
import time

import pytest

from vitpcm.utils.pools import WriterThreads


def test_every_job_has_run_when_the_block_ends_and_pending_jobs_stay_bounded():
    done, running, peak = [], [0], [0]
    lock = threading.Lock()

    def job(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
            done.append(i)

    with WriterThreads(3, depth=4) as writer:
        for i in range(20):
            writer.submit(job, i)
            assert len(writer._pending) <= 4
    assert sorted(done) == list(range(20))
    assert 1 < peak[0] <= 3  # on threads, never more than asked


def test_a_failed_write_is_raised_in_the_caller():
    def bad(i):
        if i == 2:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with WriterThreads(2) as writer:
            for i in range(50):
                writer.submit(bad, i)


def test_one_thread_writes_in_the_caller():
    seen = []
    with WriterThreads(1) as writer:
        writer.submit(lambda: seen.append(threading.current_thread()))
    assert seen == [threading.current_thread()]
