"""The log handler `serve` installs: on the event loop, a pass's lines go out in one write at the
end of the pass, in order; without a loop, at once; none is left behind."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import weakref
from collections.abc import Iterator

import pytest

from enrollment_service.observability import (
    ATOMIC_WRITE_BYTES,
    BatchingStreamHandler,
    JsonFormatter,
)


class CountingStream(io.StringIO):
    """A real text stream that keeps the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    @property
    def writes(self) -> int:
        return len(self.chunks)

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, CountingStream]]:
    stream = CountingStream()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.batching")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.handlers[:] = []


async def test_a_passs_lines_are_written_together_at_its_end(
    logged: tuple[logging.Logger, CountingStream],
) -> None:
    logger, stream = logged
    for n in range(3):
        logger.info("line %d", n)
    assert stream.getvalue() == ""  # not yet: the pass is not over
    await asyncio.sleep(0)
    assert stream.getvalue() == "line 0\nline 1\nline 2\n"
    assert stream.writes == 1
    logger.info("line 3")
    await asyncio.sleep(0)
    assert stream.getvalue().endswith("line 2\nline 3\n")
    assert stream.writes == 2


def test_without_a_loop_lines_are_written_at_once(
    logged: tuple[logging.Logger, CountingStream],
) -> None:
    logger, stream = logged
    logger.info("before")
    assert stream.getvalue() == "before\n"

    async def on_a_loop() -> None:
        logger.info("on the loop")

    asyncio.run(on_a_loop())
    logger.info("after")
    assert stream.getvalue() == "before\non the loop\nafter\n"


async def test_a_thread_beside_the_loop_writes_at_once_and_keeps_the_order(
    logged: tuple[logging.Logger, CountingStream],
) -> None:
    logger, stream = logged
    logger.info("from the loop")
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join()
    assert stream.getvalue() == "from the loop\nfrom a thread\n"
    await asyncio.sleep(0)
    assert stream.getvalue() == "from the loop\nfrom a thread\n"


async def test_shutdown_writes_what_is_pending(
    logged: tuple[logging.Logger, CountingStream],
) -> None:
    logger, stream = logged
    logger.info("last words")
    logging.shutdown(handlerList=[weakref.ref(logger.handlers[0])])  # what runs at exit
    assert stream.getvalue() == "last words\n"


async def test_json_lines_stay_one_object_per_line(
    logged: tuple[logging.Logger, CountingStream],
) -> None:
    logger, stream = logged
    logger.handlers[0].setFormatter(JsonFormatter())
    for n in range(5):
        logger.info("request %d", n, extra={"status": 200 + n})
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5
    assert all(line.startswith("{") and line.endswith("}") for line in lines)
    assert '"status":204' in lines[4]


async def test_a_busy_pass_is_written_in_whole_lines_each_write_short_enough_to_stay_whole(
    logged: tuple[logging.Logger, CountingStream],
) -> None:
    # Several workers share one stderr pipe: a write longer than PIPE_BUF may interleave with
    # theirs, so no write may be longer, nor end inside a line.
    logger, stream = logged
    lines = [f"request {n} " + ("é" if n % 7 == 0 else "x") * (40 + n % 90) for n in range(300)]
    long_line = "L" * (ATOMIC_WRITE_BYTES + 100)
    for line in [*lines[:150], long_line, *lines[150:]]:
        logger.info("%s", line)
    await asyncio.sleep(0)
    assert stream.getvalue() == "".join(
        f"{line}\n" for line in [*lines[:150], long_line, *lines[150:]]
    )
    assert stream.writes > 1
    for chunk in stream.chunks:
        assert chunk.endswith("\n")
        assert len(chunk.encode()) <= ATOMIC_WRITE_BYTES or chunk == long_line + "\n"
    # And as few writes as that allows: no two neighbours would have fitted in one.
    for first, second in zip(stream.chunks, stream.chunks[1:], strict=False):
        assert len((first + second).encode()) > ATOMIC_WRITE_BYTES


async def test_a_line_with_an_undecodable_file_name_loses_no_line(
    logged: tuple[logging.Logger, CountingStream],
) -> None:
    # os.fsdecode of a non-UTF-8 path gives a lone surrogate, which UTF-8 cannot encode as is.
    logger, stream = logged
    path = os.fsdecode(b"/data/\xff")
    logger.info("before")
    logger.info("data in %s", path)
    logger.info("after")
    await asyncio.sleep(0)
    assert stream.getvalue() == f"before\ndata in {path}\nafter\n"
