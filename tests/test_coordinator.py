"""Several processes by hand: a process other than 0 waits for the coordinator and
says in one line when nothing answers (JAX would abort with a C++ stack trace)."""

import socket

import pytest

from wsda_jax import parallel


def test_waiting_for_a_coordinator_that_never_answers_is_one_line():
    with socket.socket() as closed:  # A free port that nothing listens on.
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(ValueError, match=f"--coordinator_address=127.0.0.1:{port}: nothing"):
        parallel.wait_for_coordinator(f"127.0.0.1:{port}", timeout_s=0.5)


def test_a_listening_coordinator_is_found():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        parallel.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=5)


@pytest.mark.parametrize("address", ["localhost", "localhost:port", ":1234"])
def test_an_address_without_host_and_port_is_refused(address):
    with pytest.raises(ValueError, match="expected HOST:PORT of process 0"):
        parallel.distributed_arguments(address, 2, 1)
