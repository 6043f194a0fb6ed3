"""bench/cpu.py: each party's CPU time is given to that party."""

import multiprocessing as mp
import time

from bench.cpu import CpuMeter


def _burn(seconds: float, done) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    done.set()


def test_a_process_cpu_is_counted_for_its_party_and_per_cycle():
    ctx = mp.get_context("fork")
    done, go = ctx.Event(), ctx.Event()

    def burn_when_told() -> None:
        go.wait()
        _burn(0.3, done)

    burner = ctx.Process(target=burn_when_told)
    burner.start()
    assert burner.pid is not None  # set by start()
    meter = CpuMeter(worker_pids=[burner.pid], client_pids=[])
    meter.start()
    go.set()
    done.wait(30)
    meter.stop()
    burner.join()
    assert meter.seconds["worker"] >= 0.25, meter.seconds
    assert meter.seconds["clients"] == 0.0
    per_cycle = meter.per_cycle_ms(cycles=100)
    assert per_cycle["worker"] == round(meter.seconds["worker"] * 1000 / 100, 3)
    assert 0.0 <= per_cycle["machine_idle"] <= 1.0
