"""The ``lab_machine`` fixture: one real Debian 12 guest under QEMU per test session.

Tests that use it are marked ``qemu`` (and ``root``: building the image needs
debootstrap and chroot). The guest is booted once from copy-on-write overlays
of the cached image (``python -m lab build``) and powered off at the end of the
session, whatever happened; scenarios share it, so a test that breaks the
guest must repair it. With FERRY_LAB_ATTACH=<run dir> (``python -m lab test``)
the fixture drives a machine that process booted, and leaves it running.

The object yielded is a :class:`lab.machine.Machine`: ``ssh(cmd)`` returns a
CompletedProcess (raises on failure unless ``check=False``), ``reboot()``,
``crash()``, ``copy_to(src, dest)``, ``console`` (serial log), ``overlays``
(disk name to qcow2 path), ``inventory`` (Ansible inventory), ``host_ports``
(host 127.0.0.1 ports the guest reaches as ``ferry-host``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.cache import ensure_image
from lab.machine import Machine

LAB_TIMEOUT = 1800
"""Seconds a qemu test may take: the first one may build the image (minutes) and boot it."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """qemu tests are root tests too, and get time for a cold image build."""
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(pytest.mark.root)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(LAB_TIMEOUT))


@pytest.fixture(scope="session")
def lab_machine(tmp_path_factory):
    attach = os.environ.get("FERRY_LAB_ATTACH")
    if attach:
        yield Machine.attach(Path(attach))
        return
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (deselect with -m 'not qemu')")
    machine = Machine(ensure_image(), tmp_path_factory.mktemp("lab"))
    with machine:
        yield machine
