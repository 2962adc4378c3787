"""Environment for processes that run models (workers and benchmark references).

glibc's moving mmap threshold makes CPU TorchScript throughput at batch >= 32
swing 2x between processes; fixed large thresholds remove the swing. It only
takes effect when set before the process starts.
"""

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
