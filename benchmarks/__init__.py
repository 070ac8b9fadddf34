"""blockfs beside qemu-storage-daemon: the same images, the same fio jobs, the same run.

``python -m benchmarks`` (or ``make bench``) prepares images of random data, exposes each once
through a blockfs mount and once through qemu-storage-daemon's FUSE export, runs the same fio jobs
and block jobs on both, and reports every figure with its ratio blockfs/qemu. See README.md.

Modules: ``runner`` (the command line and the order of runs), ``exposures`` (starting and stopping
the two daemons), ``fio`` (the jobs and their results), ``procstat`` (a daemon's CPU time and peak
RSS), ``backup`` (backup jobs on both sides), ``report`` (table, JSON, chart), ``machine``.

Nothing here asserts a speed; it measures and reports.
"""
