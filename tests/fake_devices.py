"""XLA_FLAGS for tests that fake several CPU devices in one process.

XLA:CPU aborts a program when its devices do not all reach a collective within 40 s. Here up to
eight fake devices share two cores, so on a loaded machine one device's share of the work between
two collectives can outlast that (seen once in CI: test_train_sharded aborted inside a
collective-permute). The tests allow ten minutes instead. Imported as ``tests.fake_devices``.
"""


def fake_device_flags(count: int) -> str:
    """XLA_FLAGS for ``count`` CPU devices with a collective timeout that load cannot trip."""
    return (
        f"--xla_force_host_platform_device_count={count} "
        "--xla_cpu_collective_call_terminate_timeout_seconds=600"
    )
