#!/usr/bin/env python3
"""qmp_client: a minimal QMP client (Python 3 standard library only).

Connects to a QMP Unix socket, reads the greeting, negotiates capabilities,
runs one command, prints its reply, then prints events as they arrive until
Ctrl-C (or for --seconds N).

    examples/qmp_client.py /tmp/blockd.sock
    examples/qmp_client.py /tmp/blockd.sock '{"execute": "query-status"}'
    examples/qmp_client.py /tmp/blockd.sock \\
        '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0"}}'
    examples/qmp_client.py --seconds 3 /tmp/blockd.sock

The command may be given as a full QMP object ({"execute": ..., "arguments":
...}) or just as a command name (query-block). Exit status: 0 if the command
returned, 1 if it got an error reply, 2 on connection/protocol trouble.
"""

import argparse
import json
import select
import socket
import sys
import time


class QMPClient:
    """One QMP connection. Messages are JSON objects, one per line (the
    server ends them with CRLF). Replies and events may interleave: an event
    can arrive between a command and its reply, so every read sets events
    aside in self.pending_events."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.pending_events = []
        self.next_id = 0

    def read_message(self, timeout=None):
        """Next message as a dict, or None if `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line.rstrip(b"\r"))

    def greeting(self):
        msg = self.read_message(timeout=10)
        if msg is None or "QMP" not in msg:
            raise ConnectionError("expected a QMP greeting, got %r" % (msg,))
        return msg

    def execute(self, command):
        """Send one command (a dict with "execute") and return its reply.

        An "id" is added so the reply can be matched to the command; events
        read meanwhile are kept in pending_events."""
        command = dict(command)
        self.next_id += 1
        command.setdefault("id", "qmp_client-%d" % self.next_id)
        self.sock.sendall(json.dumps(command).encode() + b"\n")
        while True:
            msg = self.read_message(timeout=60)
            if msg is None:
                raise TimeoutError("no reply to %s within 60 s" % command["execute"])
            if "event" in msg:
                self.pending_events.append(msg)
            elif msg.get("id") == command["id"]:
                return msg
            else:
                print("unexpected message: %s" % json.dumps(msg), file=sys.stderr)

    def close(self):
        self.sock.close()


def format_event(ev):
    ts = ev.get("timestamp", {})
    when = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    clock = time.strftime("%H:%M:%S", time.localtime(when)) + ".%06d" % ts.get("microseconds", 0)
    data = ev.get("data")
    return "[%s] event %s%s" % (clock, ev["event"], "" if data is None else " " + json.dumps(data))


def parse_command(text):
    text = text.strip()
    if not text.startswith("{"):
        return {"execute": text}
    cmd = json.loads(text)
    if not isinstance(cmd, dict) or "execute" not in cmd:
        raise ValueError('a command is a JSON object with "execute"')
    return cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket", help="path of the server's QMP Unix socket")
    ap.add_argument("command", nargs="?", default='{"execute": "query-version"}',
                    help="command to run, as JSON or a bare name (default: query-version)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="stop watching events after this many seconds (default: until Ctrl-C)")
    a = ap.parse_args()

    try:
        command = parse_command(a.command)
    except ValueError as e:
        sys.exit("bad command %r: %s" % (a.command, e))

    try:
        q = QMPClient(a.socket)
        greeting = q.greeting()
        v = greeting["QMP"].get("version", {})
        qv = v.get("qemu", {})
        print("connected: %s (QEMU %s.%s.%s), capabilities %s" % (
            v.get("package") or "?", qv.get("major"), qv.get("minor"), qv.get("micro"),
            greeting["QMP"].get("capabilities")))

        reply = q.execute({"execute": "qmp_capabilities"})
        if "error" in reply:
            print("negotiation failed: %s" % json.dumps(reply["error"]), file=sys.stderr)
            return 2

        reply = q.execute(command)
        if "id" not in command:
            reply.pop("id", None)  # the id was ours; do not show it
        print("%s -> %s" % (command["execute"], json.dumps(reply, indent=2)))
        status = 1 if "error" in reply else 0

        if a.seconds is None:
            print("watching events; Ctrl-C to quit", flush=True)
        else:
            print("watching events for %g s" % a.seconds, flush=True)
        deadline = None if a.seconds is None else time.monotonic() + a.seconds
        while True:
            while q.pending_events:
                print(format_event(q.pending_events.pop(0)), flush=True)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            msg = q.read_message(timeout=left)
            if msg is None:
                break
            if "event" in msg:
                q.pending_events.append(msg)
            else:
                print("unexpected message: %s" % json.dumps(msg), file=sys.stderr)
        q.close()
        return status
    except KeyboardInterrupt:
        print()
        return 0
    except (OSError, ValueError) as e:  # ConnectionError, TimeoutError, JSON errors
        print("error: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
