"""A TCP forwarder that lets only so many request bytes through: uploads stall on cue.

The agent under test reaches the S3 server through it (``AWS_ENDPOINT_URL``), the
coordinator does not. ``limit(n)`` lets ``n`` more bytes of requests through and holds
the rest, so PUTs hang half-sent, exactly as on a stalled network, while the coordinator
keeps working; replies always flow. Nothing in layervault knows it is there.
"""

from __future__ import annotations

import socket
import threading


class BytesBudgetProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._budget: int | None = None  # None: unlimited
        self._cond = threading.Condition()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="budget-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def limit(self, nbytes: int | None) -> None:
        """From now on forward at most ``nbytes`` more request bytes (None: no limit)."""
        with self._cond:
            self._budget = nbytes
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _take(self, want: int) -> int:
        """How many of ``want`` bytes may pass now; blocks while the budget is spent."""
        with self._cond:
            while not self._closed and self._budget is not None and self._budget <= 0:
                self._cond.wait()
            if self._closed:
                return 0
            if self._budget is None:
                return want
            n = min(want, self._budget)
            self._budget -= n
            return n

    def _pump(self, src: socket.socket, dst: socket.socket, metered: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while data:
                    n = self._take(len(data)) if metered else len(data)
                    if n == 0:
                        return
                    dst.sendall(data[:n])
                    data = data[n:]
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
