"""What the benchmark scripts share: CPU accounting from /proc, waiting for other processes to leave the
CPUs alone, a description of the machine, the checkout's git state, peak RSS, and the text and markdown
tables they print and write into RESULTS.md.

The benchmarks run as scripts from the repository root (``python benches/bench_x.py``), so each puts its
own folder on ``sys.path`` and imports this module as ``_common``. Only the standard library is imported.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# Cores' worth of CPU time other processes may use before the machine no longer counts as idle: the
# VM's own housekeeping stays below it, and a second process doing real work does not.
CONTENDED = 0.2

# What a dino_rs build is made from: changes here make an installed extension out of date.
LIBRARY_PATHS = ("src", "python", "Cargo.toml", "Cargo.lock", "pyproject.toml")


# --------------------------------------------------------------------------------------------------
# CPU accounting and idleness
# --------------------------------------------------------------------------------------------------


def proc_cpu_s(pid="self") -> float:
    """user + system CPU seconds of a process (all its threads) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def system_busy_s() -> float:
    """Machine-wide busy CPU seconds (user + nice + system + irq + softirq) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_for_idle(budget: list, allowed: float = CONTENDED) -> None:
    """Waits (from a shared budget of seconds) until other processes use < ``allowed`` cores for 1 s.

    The budget is a one-element list so that the waits of a whole run draw on one allowance: a machine
    that never quiets down delays the run by the budget once, not before every measurement."""
    waited = False
    while True:
        t0, s0 = time.perf_counter(), system_busy_s()
        time.sleep(1.0)
        dt = time.perf_counter() - t0
        other = (system_busy_s() - s0) / dt
        if other < allowed or budget[0] <= 0:
            if waited:
                print(f"  machine {'quiet' if other < allowed else 'still busy'} ({other:.2f} cores used by others)",
                      flush=True)
            return
        if not waited:
            print(f"  other processes use {other:.2f} cores (> {allowed:.1f}): waiting up to {budget[0]:.0f} s",
                  flush=True)
            waited = True
        budget[0] -= dt


def rss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# The machine and the checkout
# --------------------------------------------------------------------------------------------------


def lscpu() -> dict:
    """``lscpu``'s fields (first occurrence of each), or {} where it cannot run."""
    kv = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.CalledProcessError):
        return kv
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            kv.setdefault(k.strip(), v.strip())
    return kv


def machine_info() -> dict:
    """CPU model, logical CPUs, physical cores (None when unknown), threads per core, hypervisor, the
    widest vector instruction set (the gemm kernels of both frameworks dispatch on it) and L2 / L3 sizes."""
    kv = lscpu()
    flags = kv.get("Flags", "").split()
    info = {
        "model": kv.get("Model name", platform.processor() or platform.machine()),
        "cpus": int(kv.get("CPU(s)", os.cpu_count() or 1)),
        "cores": None,
        "threads_per_core": int(kv.get("Thread(s) per core", 1)),
        "hypervisor": kv.get("Hypervisor vendor"),
        "isa": "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2"),
        "caches": ", ".join(f"{k.split()[0]} {kv[k]}" for k in ("L2 cache", "L3 cache") if k in kv),
    }
    try:
        info["cores"] = int(kv["Core(s) per socket"]) * int(kv.get("Socket(s)", 1))
    except (KeyError, ValueError):
        pass
    return info


def machine_line(info: dict | None = None) -> str:
    """The machine in one line, as RESULTS.md records it."""
    m = info or machine_info()
    cores = f" ({m['cores']} cores, {m['threads_per_core']} thread(s) per core)" if m["cores"] else ""
    hyp = f", {m['hypervisor']} VM" if m["hypervisor"] else ""
    caches = f"; {m['caches']}" if m["caches"] else ""
    return f"{m['model']}, {m['cpus']} CPUs{cores}, {m['isa']}{hyp}{caches}; Linux {platform.release()}"


def source_state() -> str:
    """The git commit of the checkout these scripts live in, and whether its library sources have changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *LIBRARY_PATHS], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"git {head}" + (" with uncommitted library changes" if dirty else "")


# --------------------------------------------------------------------------------------------------
# Tables and RESULTS.md
# --------------------------------------------------------------------------------------------------


def format_text(header, rows) -> str:
    """A plain-text table for the terminal: first column left-aligned, the others right-aligned, and the
    markdown bold markers (``**``) some cells carry for RESULTS.md left out."""
    rows = [[c.replace("**", "") for c in r] for r in rows]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_row(cells) -> str:
    # An empty cell is written "| |", as the hand-written rows of the tables always were.
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def format_markdown(header, rows) -> str:
    """A markdown table: first column left-aligned, the others (numbers) right-aligned."""
    out = [markdown_row(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += [markdown_row(r) for r in rows]
    return "\n".join(out)


def write_results(path: Path, section: str, start_mark: str, end_mark: str) -> None:
    """Puts ``section`` between the two markers of ``path`` (appended with them when they are missing),
    keeping the rest of the file, so that each benchmark owns one section of RESULTS.md."""
    block = f"{start_mark}\n{section.rstrip()}\n{end_mark}"
    text = path.read_text() if path.exists() else ""
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + block + text[end + len(end_mark):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "# Benchmark results\n\n") + block + "\n"
    path.write_text(text)


def results_footer(verdicts, other_max: float, stale: str | None) -> list:
    """The lines every RESULTS.md section ends with: the verdicts, then notes on contention and on
    an extension older than the checkout."""
    lines = [f"- {v}" for v in verdicts]
    if other_max >= CONTENDED:
        lines += ["", f"Note: other processes used up to {other_max:.2f} cores during a measurement; "
                  "the affected numbers are pessimistic."]
    if stale:
        lines += ["", "Note: " + stale + "."]
    return lines
