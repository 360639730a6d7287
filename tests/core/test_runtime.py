import os
import re
import subprocess
import sys

import pytest
import torch

from selfflow.core import runtime
from selfflow.core.runtime import tune_cpu_allocator
from selfflow.registry.config import RunSection
from selfflow.registry.setup import setup_process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only exists on Linux")
def test_allocator_tuning_is_accepted_by_glibc():
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True  # idempotent: a second run in the same process is fine


# ----------------------------------------------------------------------------- contended CPUs


def _fresh_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in runtime.WAIT_POLICY_VARS}
    return {**env, "OMP_DISPLAY_ENV": "VERBOSE", **extra}  # libgomp reports the policy it really uses


def _spin_count(stderr: str) -> int | None:
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    return int(found.group(1)) if found else None  # None: torch's OpenMP is not libgomp


def test_importing_selfflow_shortens_openmp_spinning_before_torch_loads():
    code = "import selfflow, os, sys; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=_fresh_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(runtime.SPIN_COUNT), "None"]
    assert _spin_count(out.stderr) in (runtime.SPIN_COUNT, None)  # libgomp's own report (its default: 300,000)


def test_a_users_own_wait_policy_is_kept():
    code = "import selfflow.cli, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = _fresh_env(OMP_WAIT_POLICY="ACTIVE")  # through the `selfflow` command's import path
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "None"] and _spin_count(out.stderr) in (30_000_000_000, None)


def test_shorten_spin_wait_only_fills_an_unset_policy(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as before torch's first import (restored after the test)
    env: dict[str, str] = {}
    assert runtime.shorten_spin_wait(env) is True and env == {"GOMP_SPINCOUNT": "10000"}
    for var, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("GOMP_SPINCOUNT", "1000"), ("KMP_BLOCKTIME", "0")):
        env = {var: value}
        assert runtime.shorten_spin_wait(env) is False and env == {var: value}
    monkeypatch.setitem(sys.modules, "torch", torch)
    env = {}  # torch already loaded: its OpenMP read the environment; claiming a setting would be false
    assert runtime.shorten_spin_wait(env) is False and env == {}


def test_threads_are_the_cores_other_processes_leave_free_never_more_than_asked():
    assert runtime.threads_for(2, 2, 0.0) == 2
    assert runtime.threads_for(2, 2, 0.4) == 2  # a light load keeps both threads
    assert runtime.threads_for(2, 2, 0.6) == 1
    assert runtime.threads_for(2, 2, 1.0) == 1  # one competing busy process: one thread
    assert runtime.threads_for(2, 2, 7.5) == 1  # never fewer than one
    assert runtime.threads_for(1, 2, 0.0) == 1  # never more than torch's count
    assert runtime.threads_for(8, 8, 2.2) == 6


def test_other_processes_load_from_proc_stat(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: cpu0 and cpu1 count, cpu2 is not ours
    stat.write_text(
        f"cpu  9 9 9 9 9 9 9 9\ncpu0 {hz} 0 {hz} 50 0 0 0 0\ncpu1 0 0 0 70 0 0 0 {hz}\ncpu2 {9 * hz} 0 0 0\n"
    )
    mark = runtime.cpu_mark([0, 1], stat)
    assert mark is not None and mark.busy == 3.0
    assert runtime.cpu_mark([0], tmp_path / "missing") is None
    a, b = runtime.CpuMark(busy=10.0, own=2.0, wall=5.0), runtime.CpuMark(busy=13.0, own=3.0, wall=6.0)
    assert runtime.other_cores(a, b) == 2.0  # 3 busy core-seconds in 1 s, 1 of them our own
    assert runtime.other_cores(a, runtime.CpuMark(busy=10.5, own=3.0, wall=6.0)) == 0.0  # never negative
    if sys.platform.startswith("linux"):
        load = runtime.busy_elsewhere(window=0.05)
        assert load is not None and load >= 0.0


def test_the_thread_count_is_decided_once_per_process(monkeypatch):
    monkeypatch.setattr(runtime, "_cap", [])
    monkeypatch.setattr(runtime, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda: 1.0)
    assert runtime.default_threads(2) == 1
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda: 0.0)  # the load went away: runs of one process agree
    assert runtime.default_threads(2) == 1 and runtime.default_threads(1) == 1
    monkeypatch.setattr(runtime, "_cap", [])
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda: None)  # no /proc/stat: torch's count
    assert runtime.default_threads(2) == 2


def test_setup_process_never_raises_the_thread_count_and_honours_run_threads(monkeypatch):
    monkeypatch.setattr(runtime, "_cap", [2])  # as measured on a quiet 2-core machine
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        setup_process(RunSection(device="cpu"))  # run.threads = 0: torch's count (here 1) or fewer
        assert torch.get_num_threads() == 1
        setup_process(RunSection(device="cpu", threads=2))
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(runtime, "_cap", [1])  # a busy machine
        setup_process(RunSection(device="cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
