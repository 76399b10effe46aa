"""bench's measuring: interleaved medians, the fp32 matmul peak timed alongside, per-step time and peak memory.

    seconds = interleaved_medians({"A": fn_a, "B": fn_b}, repeats=3, device="cpu")
    rows = ladder_rows(candidates, warmup, repeats, device, work=tokens, flops=2 * params * tokens)
"""
import ctypes
import os
import statistics
import threading
import time

import torch


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(candidates, repeats, device, warmup=None):
    """candidates {name: fn} -> {name: median seconds of fn()}. One warm-up call each first (allocator, kernels,
    caches; `warmup` {name: fn} may give a cheaper one, e.g. on a slice of the data), then `repeats` rounds of
    A, B, C, ... so that background load from other jobs falls on every candidate alike."""
    for fn in (warmup or candidates).values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ladder_rows(candidates, warmup, repeats, device, work, flops, n=2048):
    """Time a ladder {name: fn} and -> rows {what, seconds, rate = work / s, gflops, percent_of_peak}. The fp32
    matmul peak ([n, n] x [n, n], 2 n^3 FLOPs) is timed as one more candidate in the same interleaved rounds,
    so that it is measured under the same background load as the rows it is the yardstick for."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = {"fp32 matmul peak": lambda: a @ b}
    seconds = interleaved_medians(candidates | matmul, repeats, device, warmup=warmup | matmul)
    peak = 2 * n ** 3 / seconds.pop("fp32 matmul peak") / 1e9
    return [{"what": name, "seconds": s, "rate": work / s, "gflops": flops / s / 1e9,
             "percent_of_peak": 100 * flops / s / 1e9 / peak, "matmul_peak_gflops": peak} for name, s in seconds.items()]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _return_freed_memory_to_os():
    """glibc keeps freed blocks for reuse, so a step's peak could hide inside earlier steps' leftovers and RSS
    would under-count it. malloc_trim hands the free pages back first; reusing them then shows in RSS again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass                                                    # not glibc: RSS peaks may read low


class StepMeter:
    """Per-step wall time and peak extra memory (over the memory at the step's start), also for loops we do not
    own: step_begin() / step_end() around each step, a thread sampling the RSS every millisecond (CUDA: the
    allocator's counters)."""

    def __init__(self, device):
        self.device, self.seconds, self.peak_mb = device, [], []
        self.cuda = str(device).startswith("cuda")

    def step_begin(self):
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            _return_freed_memory_to_os()
            self.before, self.peak, self.done = _rss_bytes(), _rss_bytes(), threading.Event()

            def sample():
                while not self.done.is_set():
                    self.peak = max(self.peak, _rss_bytes())
                    time.sleep(0.001)
            self.thread = threading.Thread(target=sample)
            self.thread.start()
        self.t0 = time.perf_counter()

    def step_end(self):
        sync(self.device)
        self.seconds.append(time.perf_counter() - self.t0)
        if self.cuda:
            self.peak_mb.append((torch.cuda.max_memory_allocated() - self.before) / 2 ** 20)
        else:
            self.done.set()
            self.thread.join()
            self.peak_mb.append((max(self.peak, _rss_bytes()) - self.before) / 2 ** 20)

    def row(self, what, pairs_per_step):
        """Median over the steps after the first (the first allocates the optimizer state)."""
        s, m = statistics.median(self.seconds[1:]), max(self.peak_mb[1:])
        return {"what": what, "seconds_per_step": s, "rate": pairs_per_step / s, "peak_mb": m, "steps": len(self.seconds) - 1}


def peak_extra_memory_mb(fn, device):
    """Peak memory fn() adds on top of what is allocated before it (a StepMeter around one call)."""
    meter = StepMeter(device)
    meter.step_begin()
    fn()
    meter.step_end()
    return meter.peak_mb[-1]
