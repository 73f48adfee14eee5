"""A worker that the PS keeps refusing "for now" (another connection holds its id) backs off
exponentially, warns a few times only, and gives up after server.connect_timeout."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import pytest

from byzps.core.messages import Refuse
from byzps.job import Job, parse_config
from byzps.net.wire import encode
from byzps.net.worker import RETRY_CAP, Worker, WorkerFailed, retry_delay


def test_retry_delay_doubles_to_a_cap():
    assert [retry_delay(k) for k in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert retry_delay(10**6) == RETRY_CAP


class RefusingPs(threading.Thread):
    """A TCP listener that answers every connection with REFUSE(retry=True), as the PS does
    for an id whose previous connection it still holds; counts the connections."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0

    def run(self) -> None:
        frame = b"".join(bytes(b) for b in encode(Refuse("worker id 0 is already connected",
                                                         retry=True)))
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)          # the HELLO
                conn.sendall(frame)


def test_a_worker_refused_for_now_backs_off_and_gives_up(base_config, caplog):
    ps = RefusingPs()
    ps.start()
    base_config["server"].update(port=ps.port, connect_timeout=2.0)
    base_config["training"].update(model="logreg", train_limit=400, test_limit=100)
    cfg = parse_config(base_config)
    worker = Worker(cfg, Job(cfg, "./data").worker_core(0))
    caplog.set_level(logging.WARNING, logger="byzps.net.worker")
    try:
        with pytest.raises(WorkerFailed, match=r"worker 0: could not rejoin the PS within "
                                               r"server.connect_timeout=2 s \(\d+ tries; last: "
                                               r"refused for now: worker id 0 is already"):
            asyncio.run(asyncio.wait_for(worker.run(), 60))
    finally:
        ps.sock.close()
    # tries at about 0, 0.5, 1.5 and 3.5 s (the last one past the 2 s): a slow machine only
    # makes fewer; a fixed 0.5 s retry would make 5 or more within the 2 s
    assert 2 <= ps.connections <= 4
    lost = [r for r in caplog.records if "connection to the PS lost" in r.getMessage()]
    assert 1 <= len(lost) <= 3
    assert "reconnecting in 0.5 s" in lost[0].getMessage()
