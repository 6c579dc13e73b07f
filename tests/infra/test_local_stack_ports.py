"""The local stack's port check: a port counts as taken when any address of the machine holds it.

Ray binds some ports (the dashboard agent's, 52365) on the machine's interface address rather than
127.0.0.1; a check of 127.0.0.1 alone called such a port free, and a second Ray got a job agent that
could not serve ("No available agent to submit job" for ever). A listener on 127.0.0.2 stands in
for the other address (loopback only).
"""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.infra.test_manifests import LOCAL


def port_free(port: int) -> bool:
    result = subprocess.run(
        ["bash", "-c", f'source "{LOCAL}/common.sh" && port_free {port}'],
        env={"FLOWRAY_PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def test_a_port_held_on_another_address_is_not_free():
    with socket.socket() as held:
        held.bind(("127.0.0.2", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not port_free(port)
    assert port_free(port)  # released
