"""Peak memory and CPU time of a process and every process under it (a CLI run and its Dask workers), sampled.

    python benchmarks/sample_process_tree.py PID OUT.json [--every 3]

Every ``--every`` seconds until PID exits, each process of the tree is read: its CPU time (user + system,
``psutil``) and its peak resident set (``VmHWM`` of ``/proc/PID/status``, kept by the kernel, so sampling misses
no peak of a process alive at a sample); OUT.json is rewritten each time with the largest values seen per process
and the load average. ``/usr/bin/time -v`` gives the parent's peak only (and its children's CPU only when they
were waited for), which is why the workers are sampled here. A process that lives less than one interval is
missed; a worker's last few seconds of CPU may be too.
"""

from __future__ import annotations

import argparse
import json
import time

import psutil


def peak_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pid", type=int)
    ap.add_argument("out")
    ap.add_argument("--every", type=float, default=3.0)
    args = ap.parse_args()
    root = psutil.Process(args.pid)
    seen: dict[int, dict] = {}
    t0 = time.time()
    while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                cpu = p.cpu_times()
                entry = seen.setdefault(p.pid, {"cmd": " ".join(p.cmdline())[:150], "cpu_s": 0.0, "peak_rss_kb": 0})
                entry["cpu_s"] = max(entry["cpu_s"], cpu.user + cpu.system)
                entry["peak_rss_kb"] = max(entry["peak_rss_kb"], peak_rss_kb(p.pid) or 0)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        summary = {
            "elapsed_s": round(time.time() - t0, 1),
            "load": open("/proc/loadavg").read().split()[:3],
            "cpu_s_all": round(sum(e["cpu_s"] for e in seen.values()), 1),
            "procs": seen,
        }
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=1)
        time.sleep(args.every)


if __name__ == "__main__":
    main()
