"""The log handler `serve` installs: on the event loop, a pass's lines go out in one write at the
end of the pass, in order; without a loop, at once; none is left behind."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import weakref
from collections.abc import Iterator

import pytest

from enrollment_service.observability import BatchingStreamHandler, JsonFormatter


class CountingStream(io.StringIO):
    """A real text stream that counts the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
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
