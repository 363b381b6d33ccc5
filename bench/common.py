"""What the benchmark scripts share: the machine's description and the report files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


class Clock:
    """Wall time since start, less the time spent in probes (add it to `paused`)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.paused = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused


def cpu_description() -> str:
    """The CPU's model name, family/model numbers and the flags that decide its
    speed here (AVX-512, native bf16, AMX), as /proc/cpuinfo gives them, and the core count (and how
    many of them this process may run on, where `taskset` or a container's affinity restricts it)."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return f"{platform.machine()}, {os.cpu_count()} CPU cores"
    flags = set(info.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = f"{os.cpu_count()} CPU cores" + (f", {usable} of them usable here (affinity)" if usable != os.cpu_count()
                                              else "")
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family', '?')}, model "
            f"{info.get('model', '?')}; {' '.join(wanted) or 'no AVX2'}), {cores}")


def write_report(out: str | Path, name: str, text: str, results) -> None:
    """`text` to <out>/<name>.md and `results` to <out>/<name>.json; prints the text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
