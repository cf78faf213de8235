"""Test-wide setup: 8 fake CPU devices for the multi-device tests (must precede any jax import)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
