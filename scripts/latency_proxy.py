#!/usr/bin/env python3
"""TCP proxy that adds a fixed latency to each direction, to simulate real AWS SQS round trips
(~20 ms) in front of a local SQS emulator (LocalStack) in the load test.

Usage:
  scripts/latency_proxy.py --listen 127.0.0.1:4567 --target 127.0.0.1:4566 --delay-ms 10 [--count-file PATH]

Each direction gets --delay-ms (10 -> 20 ms per request/response round trip). The delay is a fixed
latency, not a throughput cap: bytes read at time t are written at t + delay, in order, however
many chunks are in flight. Each direction is a queue of (deadline, bytes) drained by a writer that
sleeps until the head's deadline (one event-loop timer per direction, not a task per chunk) and
then writes every chunk that is due in one write, so pipelined chunks do not accumulate delay.
Measured against an echo server on loopback: +20.6 ms per round trip for --delay-ms 10. EOF (half-close) is queued behind the data and forwarded with write_eof;
an error or close on either socket closes both. A direction stops reading its source while more
than 4 MiB is pending (queued, or held because the destination's send buffer is full).

Prints `latency proxy: listening on HOST:PORT -> TARGET, +N ms each way` (flushed) once listening;
exits cleanly (status 0) on SIGTERM or SIGINT. --count-file PATH: every second and on exit, a JSON
object {"connections", "active", "connect_errors", "bytes_to_target", "bytes_to_client"} is
written to PATH (atomically: a temporary file renamed over it).

Python 3 standard library only; uses uvloop when it is importable (--no-uvloop to not).
"""

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import sys

READ_SIZE = 64 * 1024
HIGH_WATER = 4 * 1024 * 1024  # pending bytes in one direction above which its source stops being read
LOW_WATER = 1024 * 1024  # ... and below which reading resumes
EOF = None  # the queue's end-of-stream marker

STATS = {"connections": 0, "active": 0, "connect_errors": 0, "bytes_to_target": 0, "bytes_to_client": 0}

# One read buffer for every socket: the event loop calls get_buffer, recv_into and buffer_updated
# back to back for one socket at a time (selector loops and uvloop), and buffer_updated copies the
# bytes out before returning, so no two reads ever share it.
_READ_BUF = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUF)


def _nodelay(transport):
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass


class Side(asyncio.BufferedProtocol):
    """One socket of a proxied connection (the client's, or the one to the target)."""

    def __init__(self, conn):
        self.conn = conn
        self.transport = None
        self.out = None  # Direction this socket's reads feed
        self.inbound = None  # Direction that writes to this socket
        self.paused_reading = False
        self.paused_writing = False

    # Reading.
    def connection_made(self, transport):
        self.transport = transport
        _nodelay(transport)
        self.conn.side_made(self)

    def get_buffer(self, sizehint):
        return _READ_VIEW

    def buffer_updated(self, nbytes):
        self.out.push(bytes(_READ_VIEW[:nbytes]))

    def eof_received(self):
        self.out.push(EOF)
        return True  # keep the socket open for writing: only its reading half has ended

    def connection_lost(self, exc):
        self.conn.close(abort=exc is not None)

    def pause(self):
        if not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()

    def resume(self):
        if self.paused_reading:
            self.paused_reading = False
            if not self.conn.closed:
                self.transport.resume_reading()

    # Writing: the transport's own buffer is full (pause) or drained (resume).
    def pause_writing(self):
        self.paused_writing = True

    def resume_writing(self):
        self.paused_writing = False
        self.inbound.flush()


class Direction:
    """Bytes read from src, written to dst at read time + delay, in order."""

    __slots__ = ("conn", "src", "dst", "queue", "pending", "timer", "done", "stat")

    def __init__(self, conn, src, dst, stat):
        self.conn = conn
        self.src = src
        self.dst = dst
        self.queue = collections.deque()
        self.pending = 0
        self.timer = None
        self.done = False
        self.stat = stat
        src.out = self
        dst.inbound = self

    def push(self, data):
        loop = self.conn.loop
        deadline = loop.time() + self.conn.delay
        self.queue.append((deadline, data))
        if data is not EOF:
            self.pending += len(data)
            if self.pending > HIGH_WATER:
                self.src.pause()
        if self.timer is None and len(self.queue) == 1 and self._writable():
            if self.conn.delay <= 0:
                self.flush()
            else:
                self.timer = loop.call_at(deadline, self._fire)

    def _writable(self):
        dst = self.dst
        return dst.transport is not None and not dst.paused_writing and not self.conn.closed

    def _fire(self):
        self.timer = None
        self.flush()

    def flush(self):
        """Writes every chunk that is due; arms the timer for the next one."""
        if self.timer is not None or not self._writable():
            return
        queue = self.queue
        loop = self.conn.loop
        due = loop.time()
        chunks = []
        eof = False
        while queue and queue[0][0] <= due:
            data = queue.popleft()[1]
            if data is EOF:
                eof = True
                break
            chunks.append(data)
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.pending -= len(data)
            STATS[self.stat] += len(data)
            self.dst.transport.write(data)
            if self.pending <= LOW_WATER:
                self.src.resume()
        if eof:
            self.done = True
            queue.clear()
            self.conn.eof_sent(self)
            return
        if queue and not self.dst.paused_writing:
            self.timer = loop.call_at(queue[0][0], self._fire)

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class Connection:
    def __init__(self, proxy):
        self.proxy = proxy
        self.loop = proxy.loop
        self.delay = proxy.delay
        self.closed = False
        self.connecting = None
        self.client = Side(self)
        self.upstream = Side(self)
        self.to_target = Direction(self, self.client, self.upstream, "bytes_to_target")
        self.to_client = Direction(self, self.upstream, self.client, "bytes_to_client")

    def side_made(self, side):
        if side is self.client:
            STATS["connections"] += 1
            STATS["active"] += 1
            self.proxy.conns.add(self)
            self.connecting = self.loop.create_task(self._connect())
        elif self.closed:
            side.transport.abort()
        else:
            self.to_target.flush()  # whatever the client sent meanwhile

    async def _connect(self):
        try:
            await self.loop.create_connection(lambda: self.upstream, self.proxy.target_host, self.proxy.target_port)
            self.connecting = None
        except OSError as exc:
            self.connecting = None
            STATS["connect_errors"] += 1
            if not self.proxy.connect_error_logged:
                self.proxy.connect_error_logged = True
                print(f"latency proxy: cannot connect to the target: {exc} (further errors counted only)",
                      file=sys.stderr, flush=True)
            self.close(abort=True)

    def eof_sent(self, direction):
        dst = direction.dst.transport
        if self.to_target.done and self.to_client.done:
            self.close()
        elif dst.can_write_eof():
            dst.write_eof()
        else:
            self.close()

    def close(self, abort=False):
        if self.closed:
            return
        self.closed = True
        STATS["active"] -= 1
        self.proxy.conns.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self.to_target.cancel()
        self.to_client.cancel()
        for side in (self.client, self.upstream):
            if side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()  # sends what the transport still buffers, then closes


class Proxy:
    def __init__(self, loop, target_host, target_port, delay):
        self.loop = loop
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.conns = set()
        self.connect_error_logged = False

    def new_client(self):
        return Connection(self).client


def write_counts(path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(STATS, f)
        f.write("\n")
    os.replace(tmp, path)


def host_port(text, what):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{what} must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def main(args, loop):
    listen_host, listen_port = host_port(args.listen, "--listen")
    target_host, target_port = host_port(args.target, "--target")
    proxy = Proxy(loop, target_host, target_port, args.delay_ms / 1000.0)
    try:
        server = await loop.create_server(proxy.new_client, listen_host, listen_port, backlog=1024, reuse_address=True)
    except OSError as exc:
        print(f"latency proxy: cannot listen on {args.listen}: {exc}", file=sys.stderr, flush=True)
        return 1
    bound = server.sockets[0].getsockname()
    bound_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"latency proxy: listening on {bound_host}:{bound[1]} -> {args.target}, +{args.delay_ms:g} ms each way",
          flush=True)
    if args.count_file:
        write_counts(args.count_file)

        async def every_second():
            while True:
                await asyncio.sleep(1)
                write_counts(args.count_file)

        loop.create_task(every_second())
    await stop.wait()
    server.close()
    for conn in list(proxy.conns):
        conn.close(abort=True)
    # Cancelled connects and the counter task end, aborted transports run connection_lost.
    others = [task for task in asyncio.all_tasks(loop) if task is not asyncio.current_task(loop)]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=2)
    await asyncio.sleep(0)
    if args.count_file:
        write_counts(args.count_file)
    return 0


def raise_fd_limit():
    """Two descriptors per proxied connection: lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def run():
    parser = argparse.ArgumentParser(description="TCP proxy adding a fixed latency to each direction.")
    parser.add_argument("--listen", default="127.0.0.1:4567", help="HOST:PORT to accept on (default 127.0.0.1:4567)")
    parser.add_argument("--target", default="127.0.0.1:4566", help="HOST:PORT to forward to (default 127.0.0.1:4566)")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="latency added to each direction (default 10)")
    parser.add_argument("--count-file", help="JSON counters written here every second and on exit")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop even if uvloop is installed")
    args = parser.parse_args()
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    for opt, value in (("--listen", args.listen), ("--target", args.target)):
        try:
            host_port(value, opt)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    raise_fd_limit()
    loop = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            pass
    if loop is None:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main(args, loop))
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(run())
