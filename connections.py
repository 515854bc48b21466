"""fleetmon's connections on waitress: what it changes of waitress's own handling.

Written against waitress 3.0, whose internals (its channel, server and task classes)
these subclass. Where a reverse proxy (nginx, Caddy) stands in front of fleetmon, it does
all of this itself, and fleetmon sees only the proxy's few connections.

- A 204 keeps the connection open (KeepAliveTask); the test
  test_stock_waitress_still_closes_the_connection_after_a_204 in tests/test_server.py
  fails on the waitress release that does this itself, and then the class goes.
- HTTP that waitress cannot parse is answered in JSON (JsonErrorTask).
- A request must arrive in full within REQUEST_SECONDS of its first byte, or is answered
  408 (FleetmonChannel, FleetmonServer.maintenance).
- At the connection limit, the connection idle the longest makes room for a new client,
  as nginx does (FleetmonServer.handle_accept).
- Idleness is timed by the monotonic clock, which no change of the wall clock moves.
- The contract's requests have a worker of their own, and everything else (pages, the
  fleet's API, /metrics, the docs) another (Lanes): a device never waits behind a page,
  and a page gives way, between its rows, to a device's request being served.
"""

import json
import logging
import socket
import threading
import time
import warnings
from operator import attrgetter

from flask import Flask
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

from fleetmon import MAX_BODY_BYTES

# How waitress serves fleetmon (OPERATING.md, "How it works", says why):
SETTINGS = {
    # Worker threads in each of the two Lanes. Python runs one thread at a time and
    # SQLite takes one writer at a time, so more only add hand-offs. Slow clients hold no
    # worker: waitress reads and writes sockets in a thread of its own.
    "threads": 1,
    # Enough for hundreds of idle or slow clients while staying under the 512 sockets
    # that select() can watch on Windows.
    "connection_limit": 450,
    # Drop a connection that has sent nothing for this long between requests. Checked
    # every second, because the same check enforces REQUEST_SECONDS.
    "channel_timeout": 15,
    "cleanup_interval": 1,
    # The socket thread sends a response of up to this many bytes, not the worker: a
    # worker sending for itself leaves the socket thread spinning on the channel's lock,
    # holding the GIL, and throughput with many clients collapses (benchmark.py shows
    # it). waitress has deprecated the setting but still honours it.
    "send_bytes": 18_000,
    # Refuse a larger body from its Content-Length, before reading it. waitress refuses
    # a length equal to its limit too, hence the one byte more.
    "max_request_body_size": MAX_BODY_BYTES + 1,
}


class KeepAliveTask(WSGITask):
    """waitress's task, but keeping the connection open after a 204.

    waitress closes the connection after any HTTP/1.1 response without a length, and a
    204 may not carry one, so each heartbeat would cost a new connection. A 204 ends at
    its blank line (RFC 9112, section 6.3), so nothing needs closing.
    Upstream: https://github.com/Pylons/waitress/pull/502; when a release has it, this
    class goes (the module's docstring names the test that tells when).
    """

    def set_close_on_finish(self) -> None:
        ends_at_blank_line = not self.has_body and self.version == "1.1" and not self.wrote_header
        client_asks_to_close = self.request.headers.get("CONNECTION", "").lower() == "close"
        if ends_at_blank_line and not client_asks_to_close:
            return
        super().set_close_on_finish()


class JsonErrorTask(ErrorTask):
    """waitress's own answer to HTTP it cannot parse, as JSON like fleetmon's other errors."""

    def execute(self) -> None:
        error = self.request.error
        body = json.dumps({"msg": f"{error.reason}: {error.body}"}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


# A device sends its whole request, head and body, at once. A client that trickles one
# holds a connection slot all the while (each byte resets channel_timeout), so a request
# must arrive in full within this time of its first byte.
REQUEST_SECONDS = 10


def _request_timeout_response() -> bytes:
    body = json.dumps({"msg": f"Request Timeout: the request did not arrive within {REQUEST_SECONDS} s"}).encode()
    head = ("HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


REQUEST_TIMEOUT_RESPONSE = _request_timeout_response()


class FleetmonChannel(HTTPChannel):
    """waitress's channel, knowing when the request it is reading began to arrive."""

    task_class = KeepAliveTask
    error_task_class = JsonErrorTask
    request_began: float | None = None  # None while no request is being read
    timed_request = None  # the request whose beginning that is

    # waitress sets last_activity from the wall clock, which a clock step moves: stepped
    # back two hours, it left an idle connection open for those two hours. Whatever it
    # is given, this keeps the monotonic time of the setting, as every check here reads.
    @property
    def last_activity(self) -> float:
        return self._last_activity

    @last_activity.setter
    def last_activity(self, wall_clock_now: float) -> None:
        self._last_activity = time.monotonic()

    def reading_request(self) -> bool:
        request = self.request
        # Blank lines before a request are allowed (RFC 9112, section 2.2) and begin none.
        return request is not None and bool(request.headers_finished or request.header_plus.strip())

    def received(self, data: bytes) -> bool:
        # Runs in the socket thread only, as the server's checks do.
        result = super().received(data)
        if not self.reading_request():
            self.request_began = self.timed_request = None
        elif self.request is not self.timed_request:  # a request began in this data
            self.request_began = self.last_activity  # when handle_read() got the data
            self.timed_request = self.request
        return result

    def between_requests(self) -> bool:
        """Nothing being read, queued, run or written: closing it loses no request."""
        return not self.reading_request() and not self.requests and not self.total_outbufs_len

    def request_waiting(self) -> bool:
        """Whether bytes have come that the channel has yet to read: a request, perhaps."""
        try:
            return self.socket.recv(1, socket.MSG_PEEK) != b""  # b"": the client has gone
        except OSError:  # BlockingIOError when nothing has come
            return False

    def time_out_request(self) -> None:
        """Answer 408 to the request being read, and close once that is sent."""
        with self.outbuf_lock:  # as waitress's send_continue() writes
            self.outbufs[-1].append(REQUEST_TIMEOUT_RESPONSE)
            self.current_outbuf_count += len(REQUEST_TIMEOUT_RESPONSE)
            self.total_outbufs_len += len(REQUEST_TIMEOUT_RESPONSE)
        self.close_when_flushed = True  # and reads no more
        self.request_began = None


def is_contract_request(path: str) -> bool:
    """A device's heartbeat or upload, or a read of its stats."""
    return path.startswith("/api/v1/devices/") and path.endswith(("/heartbeat", "/stats"))


class DeviceTask:
    """A device's request, to be served holding the lock that pages give way to."""

    def __init__(self, channel: HTTPChannel, serving: threading.RLock):
        self.channel, self.serving = channel, serving

    def __repr__(self) -> str:  # waitress logs a task that fails by it
        return repr(self.channel)

    def service(self) -> None:
        with self.serving:
            self.channel.service()

    def cancel(self) -> None:
        self.channel.cancel()


class Lanes:
    """waitress's task dispatcher, as two: one for the contract's requests and one for the
    rest, each with its own workers. A page of a large fleet takes tens of milliseconds;
    with one queue for both, the heartbeats behind the pages of four open tabs waited for
    them (benchmark.py, section 10, two tabs plain and two filtered, side by side in one
    spell: p99 128 ms in one queue, 40 ms in lanes).

    The lanes still share the GIL. At each step of a request the devices' worker needs
    it back, and beside a page's Python it waits up to the switch interval for it. So a
    page gives way to a device's request being served (give_way). At 100,000 devices,
    with a busy loop on the machine's other core, four runs of each, alternating:
    - heartbeats at 500/s beside four tabs reloading the page had p99 21-37 ms before,
      and 19-29 ms with the pages giving way; beside four tabs filtered to the whole
      fleet, 23-36 ms and 20-34 ms;
    - Python's switch interval is left at its own 5 ms: with the pages giving way, a
      shorter 1 ms gave 20-61 ms and 29-113 ms, against 24-31 ms and 23-32 ms."""

    def __init__(self, threads: int):
        self.contract, self.rest = ThreadedTaskDispatcher(), ThreadedTaskDispatcher()
        self.contract.set_thread_count(threads)
        self.rest.set_thread_count(threads)
        # Held while a device's request is served, so the devices' requests are served one
        # at a time, whatever the threads. Reentrant: a device's request that gave way
        # would wait for itself.
        self.serving_devices = threading.RLock()

    def give_way(self) -> None:
        """Wait while a device's request is being served: what a page calls between its
        steps (fleet.give_way_to_devices)."""
        with self.serving_devices:
            pass

    def add_task(self, channel: HTTPChannel) -> None:
        # waitress adds a channel each time its next request is to be served.
        # A request waitress could not parse may have no path: JsonErrorTask answers it.
        if is_contract_request(getattr(channel.requests[0], "path", "")):
            self.contract.add_task(DeviceTask(channel, self.serving_devices))
        else:
            self.rest.add_task(channel)

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> None:
        for lane in (self.contract, self.rest):
            lane.set_thread_count(0)  # both told to stop before either is waited for
        for lane in (self.contract, self.rest):
            lane.shutdown(cancel_pending, timeout)


class FleetmonServer(TcpWSGIServer):
    """waitress's server, with REQUEST_SECONDS, and at the connection limit making room
    for a new client by closing the connection idle the longest, as nginx does."""

    channel_class = FleetmonChannel

    def close(self) -> None:
        self.task_dispatcher.shutdown()  # its workers first, whether or not it ran
        super().close()

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # channel_timeout
        for channel in self.active_channels.values():
            if channel.request_began is None:
                continue
            if channel.requests or channel.total_outbufs_len:
                # A pipelined request waits on the server, which reads no more of it
                # until it has answered the ones before: its time starts again.
                channel.request_began = now
            elif now - channel.request_began > REQUEST_SECONDS:
                channel.time_out_request()

    def has_room(self) -> bool:
        return len(self._map) < self.adj.connection_limit  # as waitress counts

    def channel_to_shed(self) -> FleetmonChannel | None:
        """The channel idle the longest, of those with nothing come for them to read:
        a client's request may be waiting for the socket thread to read it, even that
        of a client just accepted, before its first read."""
        idle = [channel for channel in self.active_channels.values() if channel.between_requests()]
        idle.sort(key=attrgetter("last_activity"))
        return next((channel for channel in idle if not channel.request_waiting()), None)

    def readable(self) -> bool:
        # waitress's, but by the monotonic clock, as the channels' last_activity; and at
        # the limit it still accepts while a connection can be shed.
        now = time.monotonic()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        if not self.accepting:
            return False
        full = not self.has_room() and not any(c.between_requests() for c in self.active_channels.values())
        if full != self.in_connection_overflow:
            self.in_connection_overflow = full
            if full:
                self.logger.warning("every connection is busy at the connection limit: new ones wait")
        return not full

    def handle_accept(self) -> None:
        if self.has_room():
            super().handle_accept()
            return
        idlest = self.channel_to_shed()
        if idlest is None:
            return  # the client waits in the listen queue, as with waitress
        # Accept first: closed first, the idle channel's descriptor could go to the new
        # socket, and an event select() reported for the old socket be handled as the
        # new one's.
        connections = len(self._map)
        super().handle_accept()
        if len(self._map) > connections:  # accepted
            idlest.handle_close()


def create_server(app: Flask, listener: socket.socket, **settings) -> FleetmonServer:
    """A waitress server for app on a listening socket, with SETTINGS (and these) and
    fleetmon's channel, its Lanes' give_way in app.extensions["connections.give_way"].
    Closes listener if it cannot be made."""
    # With one worker a lane, requests queue by design; waitress would warn of every queue.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "send_bytes", DeprecationWarning)  # see SETTINGS
            adj = Adjustments(sockets=[listener], **(SETTINGS | settings))
        # What waitress.create_server() does with a socket it is given, but with our class.
        sockinfo = (listener.family, listener.type, listener.proto, listener.getsockname())
        lanes = Lanes(adj.threads)
        try:
            server = FleetmonServer(app, _sock=listener, bind_socket=False, adj=adj, sockinfo=sockinfo, dispatcher=lanes)
            app.extensions["connections.give_way"] = lanes.give_way
            return server
        except BaseException:
            lanes.shutdown()
            raise
    except BaseException:
        listener.close()
        raise
