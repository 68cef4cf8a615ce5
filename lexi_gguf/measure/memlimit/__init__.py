"""`lexi-gguf bench --mem-limit SIZE`: decode speed of a model larger than the memory it may use.

Each configuration (full k, each stored LExI budget, uniform k at the same total) runs in a fresh
child process inside a memory cgroup (v2: memory.max; v1: memory.limit_in_bytes) created and removed
by the bench. The child joins the group before it loads anything, evicts the model file from the page
cache (posix_fadvise DONTNEED, no root needed), loads it mmapped (llama.cpp's MAP_POPULATE reads the
file through the group, so what stays cached is what the limit allows), runs a fixed warm-up, then
decodes n_gen tokens and reports decode tok/s, major page faults per token, bytes read from storage per
token (/proc/self/io read_bytes) and the group's peak memory. Page-cache pages are charged to the group
that faulted them in, which is why the file is evicted first: pages cached by someone else would be
free hits that the limit never sees.

Creating a cgroup needs root; without it the error says so in one line.

The pieces, one concern each: cgroup (groups and sizes), pagecache (mincore, eviction), counters
(/proc and rusage), disk (the device and its rates), child (one decode in a fresh interpreter) and
bench (the configurations, table, plot).
"""
from .bench import bench_mem_limited, plot, table
from .cgroup import detect, fmt_size, memory_cgroup, parse_size
from .child import run_child
from .disk import disk_of, disk_rates
from .pagecache import evict, resident_bytes

__all__ = ["bench_mem_limited", "detect", "disk_of", "disk_rates", "evict", "fmt_size", "memory_cgroup",
           "parse_size", "plot", "resident_bytes", "run_child", "table"]
