"""Loopback capture of the HTTP requests sent to one TCP port, with kernel timestamps.

For bench/drain.py: the instant each callback completion request hit the wire, free of any
process's event-loop lag. An AF_PACKET socket on `lo` with SO_TIMESTAMPNS gets, for every
outgoing segment to --port (a classic BPF filter drops the rest in the kernel: the incoming
copy of each loopback packet, PostgreSQL's traffic, the answers), the CLOCK_REALTIME instant
the kernel handed it to the device (comparable with time.time()). Each client connection's
byte stream is reassembled by sequence number and cut into HTTP/1.1 requests (Content-Length
bodies, as aiohttp sends a bytes body); a request is stamped with its first segment.

    python bench/wiretap.py --port P --out FILE --ready-file F

writes F once capturing and, on SIGTERM or SIGINT, drains the socket and writes FILE:

    {"requests": [[ts, [callbackId, …]], …],   # POST /automation/v4/actions/callbacks/complete
     "other_requests": n, "unparsed": n, "stream_gaps": n, "truncated": n,
     "packets": n, "kernel_packets": n, "drops": n, "rcvbuf": bytes}

"drops" (and "kernel_packets") come from PACKET_STATISTICS; "stream_gaps" counts segments
that arrived after a hole in their stream (their requests are lost), "unparsed" requests
whose head or body could not be parsed. Needs root or CAP_NET_RAW: without it the process
exits with code 3 (EXIT_NO_CAPTURE) and a message on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

EXIT_NO_CAPTURE = 3
CALLBACKS_PATH = b"/automation/v4/actions/callbacks/complete"

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # beyond rmem_max; CAP_NET_ADMIN
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SNAPLEN = 1 << 18  # a GSO segment on lo is up to 64 KiB
RCVBUF = 64 << 20
TIMESPEC = struct.Struct("@ll")
REQUEST_LINE = re.compile(rb"[A-Z]+ /")


def bpf_program(port: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF for `outbound and tcp dst port <port>` on lo (Ethernet framing).

    (code, jt, jf, k); a jump goes to the instruction 1 + offset after it. IPv4 (non-first
    fragments rejected, header length from IHL) and IPv6 without extension headers.
    """
    drop, accept = 17, 16
    prog = [
        (0x30, 0, 0, 0xFFFFF004),  # 0  ldb  [SKF_AD_PKTTYPE]
        (0x15, 0, drop - 2, PACKET_OUTGOING),  # 1  jeq  #OUTGOING
        (0x28, 0, 0, 12),  # 2  ldh  [12]          EtherType
        (0x15, 0, 11 - 4, 0x0800),  # 3  jeq  #IPv4        else -> 11
        (0x30, 0, 0, 23),  # 4  ldb  [23]          IPv4 protocol
        (0x15, 0, drop - 6, 6),  # 5  jeq  #TCP
        (0x28, 0, 0, 20),  # 6  ldh  [20]          flags + fragment offset
        (0x45, drop - 8, 0, 0x1FFF),  # 7  jset #0x1fff      a later fragment: drop
        (0xB1, 0, 0, 14),  # 8  ldxb 4*([14]&0xf)   X = IPv4 header length
        (0x48, 0, 0, 16),  # 9  ldh  [x+16]        TCP destination port
        (0x15, accept - 11, drop - 11, port),  # 10 jeq  #port
        (0x15, 0, drop - 12, 0x86DD),  # 11 jeq  #IPv6
        (0x30, 0, 0, 20),  # 12 ldb  [20]          next header
        (0x15, 0, drop - 14, 6),  # 13 jeq  #TCP
        (0x28, 0, 0, 56),  # 14 ldh  [56]          TCP destination port
        (0x15, accept - 16, drop - 16, port),  # 15 jeq  #port
        (0x06, 0, 0, SNAPLEN),  # 16 ret  #SNAPLEN     accept
        (0x06, 0, 0, 0),  # 17 ret  #0           drop
    ]
    assert len(prog) == drop + 1
    return prog


def open_capture(port: int) -> socket.socket:
    """A packet socket on lo that receives only outgoing TCP segments to `port`, timestamped.

    Opened with protocol 0 (receives nothing) and bound to ETH_P_ALL only once the filter is
    attached, so that no unfiltered packet gets queued.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        prog = bpf_program(port)
        insns = ctypes.create_string_buffer(b"".join(struct.pack("@HBBI", *i) for i in prog))
        fprog = struct.pack("@HP", len(prog), ctypes.addressof(insns))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # up to rmem_max
        sock.bind(("lo", ETH_P_ALL))
    except BaseException:
        sock.close()
        raise
    return sock


class Stream:
    """One client-to-server TCP byte stream, cut into HTTP requests."""

    def __init__(self, next_seq: int | None, counts: dict[str, int]) -> None:
        self.next_seq = next_seq  # None: out of sync, wait for a segment with a request line
        self.counts = counts
        self.buf = bytearray()
        self.start = 0.0  # kernel timestamp of the segment holding buf's first byte

    def feed(self, seq: int, payload: bytes, ts: float) -> list[tuple[float, bytes, bytes]]:
        """Add one segment; return (first-segment ts, head, body) of each request it completes.

        After a hole in the stream or an unparseable head, the stream resyncs on the next
        segment that starts with a request line.
        """
        if self.next_seq is not None:
            ahead = (seq - self.next_seq) & 0xFFFFFFFF
            if ahead >= 1 << 31:  # retransmission: keep only the bytes not seen yet
                payload = payload[(self.next_seq - seq) & 0xFFFFFFFF :]
            elif ahead:
                self.counts["stream_gaps"] += 1
                self.desync()
        if self.next_seq is None:
            if not REQUEST_LINE.match(payload):
                return []
            self.next_seq = seq
        if not payload:
            return []
        self.next_seq = (self.next_seq + len(payload)) & 0xFFFFFFFF
        if not self.buf:
            self.start = ts
        self.buf += payload
        done: list[tuple[float, bytes, bytes]] = []
        while (head_end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buf[:head_end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value) if value.strip().isdigit() else -1
            if length < 0:
                self.counts["unparsed"] += 1
                self.desync()
                break
            end = head_end + 4 + length
            if len(self.buf) < end:
                break
            done.append((self.start, head, bytes(self.buf[head_end + 4 : end])))
            del self.buf[:end]
            self.start = ts  # what is left came in this segment
        return done

    def desync(self) -> None:
        """Drop the partial request and wait for the next request line."""
        self.next_seq = None
        self.buf.clear()


class Tap:
    """Decodes captured frames and keeps the requests."""

    def __init__(self) -> None:
        self.streams: dict[tuple[bytes, int], Stream] = {}
        self.requests: list[tuple[float, list[str]]] = []
        self.counts = dict.fromkeys(
            ("packets", "other_requests", "unparsed", "stream_gaps", "truncated"), 0
        )

    def frame(self, data: bytes, ts: float) -> None:
        """One Ethernet frame (already filtered to outgoing TCP to the port)."""
        self.counts["packets"] += 1
        if data[12:14] == b"\x08\x00":  # IPv4
            ip = data[26:34]
            tcp = 14 + (data[14] & 0x0F) * 4
            end = 14 + int.from_bytes(data[16:18])
        else:  # IPv6, the filter lets nothing else through
            ip = data[22:54]
            tcp = 54
            end = tcp + int.from_bytes(data[18:20])
        sport, _, seq = struct.unpack_from("!HHI", data, tcp)
        flags = data[tcp + 13]
        payload = data[tcp + (data[tcp + 12] >> 4) * 4 : end]
        key = (ip, sport)
        if flags & 0x02:  # SYN: a new connection from this address and port
            self.streams[key] = Stream((seq + 1) & 0xFFFFFFFF, self.counts)
        stream = self.streams.setdefault(key, Stream(None, self.counts))
        for start, head, body in stream.feed(seq, payload, ts):
            self.request(start, head, body)
        if flags & 0x05:  # FIN or RST
            del self.streams[key]

    def request(self, ts: float, head: bytes, body: bytes) -> None:
        """Record a callbacks request's callbackIds; count the others."""
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"POST" or path != CALLBACKS_PATH:
            self.counts["other_requests"] += 1
            return
        try:
            cids = [str(i["callbackId"]) for i in json.loads(body)["inputs"]]
        except (ValueError, KeyError, TypeError):
            self.counts["unparsed"] += 1
            return
        self.requests.append((ts, cids))


def capture(sock: socket.socket, tap: Tap) -> None:
    """Feed the tap until SIGTERM/SIGINT, then drain what the socket still holds."""
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sock.settimeout(0.2)
    cmsg_size = socket.CMSG_SPACE(TIMESPEC.size)
    while True:
        if stopping:
            sock.setblocking(False)
        try:
            data, ancdata, flags, _addr = sock.recvmsg(SNAPLEN, cmsg_size)
        except TimeoutError:
            continue
        except BlockingIOError:
            return
        if flags & socket.MSG_TRUNC:
            tap.counts["truncated"] += 1
        ts = 0.0
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = TIMESPEC.unpack(value)
                ts = sec + nsec / 1e9
        tap.frame(data, ts)


def main() -> int:
    """Parse options, capture, dump."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True, help="the server's TCP port on loopback")
    p.add_argument("--out", required=True, help="JSON dump written at exit")
    p.add_argument("--ready-file", required=True, help="written once the capture is on")
    args = p.parse_args()
    try:
        sock = open_capture(args.port)
    except OSError as exc:
        print(f"wiretap: cannot capture on lo ({exc}); needs root or CAP_NET_RAW", file=sys.stderr)
        return EXIT_NO_CAPTURE
    tap = Tap()
    write_atomic(Path(args.ready_file), f"lo tcp dst port {args.port}\n")
    capture(sock, tap)
    kernel_packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    out: dict[str, Any] = {
        "requests": tap.requests,
        **tap.counts,
        "kernel_packets": kernel_packets,
        "drops": drops,
        "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
    }
    sock.close()
    write_atomic(Path(args.out), json.dumps(out))
    return 0


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a reader never sees half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
