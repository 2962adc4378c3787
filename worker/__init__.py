"""tensorq worker: process pool, device pinning, batched inference loop, model registry."""
