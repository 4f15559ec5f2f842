"""One local Ray instance for a test module: 2 CPUs, no dashboard, a small object store."""

from __future__ import annotations

import logging
import os


def local_cluster():
    """Generator for a module-scoped fixture: yields the instance's GCS address, shuts it down after."""
    import ray

    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=96 * 2**20,
             log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
