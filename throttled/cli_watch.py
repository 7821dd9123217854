"""`throttled queues [list]`: the queue table, once (plain, or the API's JSON) or, with
--watch, redrawn in place (rich) with a bar per queue for what left its backlog since the
watch started.

On a terminal the table is redrawn where it stands; otherwise (a pipe, a file, a test) each
refresh is printed after the last as plain text, so a log of a watch reads top to bottom.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from throttled.cli import _Fatal
from throttled.cli_ops import intake_for, relative, view_of
from throttled.cli_portals import _database, _dump, _load, _table, _text

if TYPE_CHECKING:
    from throttled.config import Config
    from throttled.db.repository import Repository

PLAIN_WIDTH = 200  # columns of a refresh printed as plain text (rich assumes 80)
BAR_WIDTH = 12

View = dict[str, Any]


QUEUE_HEADERS = [
    "ID",
    "KEY",
    "PORTAL",
    "STATE",
    "BACKLOG",
    "RATE",
    "NEXT SEND",
    "DRAIN ETA",
    "FAILED",
    "EXPIRED",
]
QUEUE_RIGHT = {0, 2, 4, 8, 9}  # (numeric columns)
_UNIT = {"seconds": "s", "minutes": "m", "hours": "h", "days": "d"}


async def queue_views(cfg: Config, repo: Repository, args: argparse.Namespace) -> list[Any]:
    """The listing's views, filtered and in order, as `GET /api/queues` makes them."""
    from throttled.queue_view import QueueFilter, ordered

    keep = QueueFilter(args.portal, args.state, True if args.at_risk else None)
    intake = await intake_for(cfg, repo)  # (each time: a watch sees a config change)
    details = await repo.list_queues(keep.portal_id)
    stats = await repo.queue_stats(None)
    now = time.time()
    views = [view_of(intake, d, stats.get(d.id), now) for d in details]
    kept = [v for _, v in ordered((v for v in views if keep.keeps(v)), args.sort, now)]
    return kept[: args.limit] if args.limit else kept


def _short_rate(rate: dict[str, Any] | None) -> str:
    if rate is None:
        return "-"
    text = f"{rate['max_throughput']}/{rate['time_period']:g}{_UNIT[rate['time_unit']]}"
    if rate["pacing"] == "even":
        text += " even"
    if rate["schedule"] is not None:
        text += " sched"  # (release days or hours: `queues show` has them)
    return text


def queue_row(view: dict[str, Any], now: float) -> list[str]:
    """One queue as the table's cells."""
    drains = relative(view["drains_at"], now)
    return [
        str(view["id"]),
        _text(view["key"], 40),
        str(view["portal_id"]),
        view["state"] + ("*" if view["override"] else ""),
        str(view["backlog"]),
        _short_rate(view["rate"]),
        relative(view["next_send_at"], now),
        drains + (" AT RISK" if view["at_risk"] else ""),
        str(view["failed"]),
        str(view["expired"]),
    ]


def list_queues(args: argparse.Namespace) -> int:
    """`throttled queues [list]`: the table once, its JSON, or --watch."""
    if args.watch:
        return _watch(args)
    cfg = _load(args)

    async def run() -> list[dict[str, Any]]:
        async with _database(cfg) as repo:
            return await queue_views(cfg, repo, args)

    views = asyncio.run(run())
    if args.json:
        _dump({"queues": views})
    elif not views:
        print("no queues" + (" match" if args.portal or args.state or args.at_risk else ""))
    else:
        now = time.time()
        print("\n".join(_table(QUEUE_HEADERS, [queue_row(v, now) for v in views], QUEUE_RIGHT)))
        if any(v["override"] for v in views):
            print("* an operator's rate override is set (throttled queues show ID)")
    return 0


def _watch(args: argparse.Namespace) -> int:
    if args.json:
        raise _Fatal("--watch draws a table: leave out --json")
    cfg = _load(args)

    async def run() -> None:
        async with _database(cfg) as repo:
            await watch(
                lambda: queue_views(cfg, repo, args),
                headers=QUEUE_HEADERS,
                right=QUEUE_RIGHT,
                row=queue_row,
                interval=args.interval,
                count=args.count,
            )

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        asyncio.run(run())
    return 0


class Progress:
    """Per queue, how much its backlog went down since the watch started: sent (or
    released, or expired) of sent plus what is left. New arrivals only add to what is
    left."""

    def __init__(self) -> None:
        self._last: dict[int, int] = {}
        self.sent: dict[int, int] = {}

    def update(self, views: Sequence[View]) -> None:
        """Take up a refresh."""
        for view in views:
            qid, backlog = view["id"], view["backlog"]
            last = self._last.get(qid)
            if last is not None and backlog < last:
                self.sent[qid] = self.sent.get(qid, 0) + last - backlog
            self._last[qid] = backlog

    def fraction(self, view: View) -> float | None:
        """sent / (sent + backlog); None for a queue that neither sent nor has a backlog."""
        sent = self.sent.get(view["id"], 0)
        total = sent + view["backlog"]
        return None if total == 0 else sent / total


def _bar(fraction: float | None) -> RenderableType:
    if fraction is None:
        return Text("")
    grid = Table.grid(padding=(0, 1))
    grid.add_row(
        ProgressBar(total=100.0, completed=fraction * 100, width=BAR_WIDTH),
        Text(f"{fraction:4.0%}"),
    )
    return grid


def render(
    views: Sequence[View],
    *,
    headers: Sequence[str],
    right: set[int],
    row: Callable[[View, float], list[str]],
    progress: Progress,
    title: str,
    width: int = PLAIN_WIDTH,
) -> Table:
    """One refresh as a rich Table (cells are Text: stored values are never markup). On a
    terminal narrower than the table, KEY is left out, then the bars (rich would squeeze
    every column, the ids too)."""
    now = time.time()
    rows = [row(view, now) for view in views]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    shown = list(range(len(headers)))
    bars = True
    if _width(widths, shown, bars) > width and "KEY" in headers:
        shown.remove(headers.index("KEY"))
    if _width(widths, shown, bars) > width:
        bars = False
    table = Table(
        title=title,
        title_justify="left",
        caption=f"{len(views)} queue(s), backlog {sum(v['backlog'] for v in views)}",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
        pad_edge=False,
    )
    for i in shown:
        table.add_column(headers[i], justify="right" if i in right else "left", no_wrap=True)
    if bars:
        table.add_column("SENT", no_wrap=True)
    for view, cells in zip(views, rows, strict=True):
        texts: list[RenderableType] = [Text(cells[i]) for i in shown]
        if bars:
            draining = view["state"] in ("draining", "releasing") or view["id"] in progress.sent
            texts.append(_bar(progress.fraction(view) if draining else None))
        table.add_row(*texts)
    return table


def _width(widths: list[int], shown: list[int], bars: bool) -> int:
    """About how wide the table is: its columns, 3 columns between each."""
    columns = [widths[i] for i in shown] + ([BAR_WIDTH + 5] if bars else [])
    return sum(columns) + 3 * (len(columns) - 1)


async def watch(
    fetch: Callable[[], Awaitable[Sequence[View]]],
    *,
    headers: Sequence[str],
    right: set[int],
    row: Callable[[View, float], list[str]],
    interval: float,
    count: int | None,
    console: Console | None = None,
) -> None:
    """Redraw every `interval` seconds, `count` times (None: until cancelled, Ctrl-C)."""
    console = console or Console(highlight=False)
    if not console.is_terminal:
        console.width = PLAIN_WIDTH
    progress = Progress()
    every = f"every {interval:g}s, Ctrl-C stops"

    async def refresh(n: int) -> Table:
        views = await fetch()
        progress.update(views)
        at = datetime.now(UTC).strftime("%H:%M:%SZ")
        of = f"/{count}" if count else ""
        title = f"throttled queues at {at}: refresh {n}{of}, {every}"
        return render(
            views,
            headers=headers,
            right=right,
            row=row,
            progress=progress,
            title=title,
            width=console.width,
        )

    async def pace(n: int) -> bool:
        if count is not None and n >= count:
            return False
        await asyncio.sleep(interval)  # (Ctrl-C cancels it: asyncio.run's handler)
        return True

    n = 1
    if console.is_terminal:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            live.update(await refresh(n), refresh=True)
            while await pace(n):
                n += 1
                live.update(await refresh(n), refresh=True)
        return
    _print_plain(console, await refresh(n))
    while await pace(n):
        n += 1
        _print_plain(console, await refresh(n))


def _print_plain(console: Console, table: Table) -> None:
    """A refresh as text, without the padding rich puts at the end of each line."""
    with console.capture() as captured:
        console.print(table)
    lines = (line.rstrip() for line in captured.get().splitlines())
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()
