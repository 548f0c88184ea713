import logging
import signal
import time
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError, close_old_connections, connection

from audit.services import SEAL_BATCH, audit_seal, audit_seal_all

log = logging.getLogger("audit.sealer")


class Command(BaseCommand):
    help = (
        "Link committed audit events into the hash chain and the Merkle tree, signing a checkpoint per batch. Once by default; with --loop, keep sealing "
        "(run exactly as many as you like: one at a time holds the sealer lock)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--loop", action="store_true", help="keep sealing until SIGTERM or SIGINT")
        parser.add_argument("--batch", type=int, default=SEAL_BATCH, help="events per transaction")
        parser.add_argument(
            "--interval",
            type=float,
            default=0.2,
            help="seconds to sleep when nothing was left to seal (or another sealer holds the lock)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        batch = options["batch"]
        if not options["loop"]:
            self.stdout.write(f"sealed {audit_seal_all(limit=batch)} events")
            return
        stopping = False

        def stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if connection.vendor != "postgresql":
            # SQLite links each event as it is written; stay up so process managers (Procfile,
            # scripts/run.sh) that stop everything when one process exits keep running.
            log.info("audit sealer: %s links events inline, nothing to do", connection.vendor)
            while not stopping:
                time.sleep(1)
            return
        log.info("audit sealer started", extra={"batch": batch})
        while not stopping:
            try:
                result = audit_seal(limit=batch)
            except DatabaseError as exc:  # database away or restarting: drop the connection, try again
                log.warning("audit sealer: %s", f"{type(exc).__name__}: {exc}"[:300])
                connection.close()
                time.sleep(max(1.0, options["interval"]))
                continue
            close_old_connections()
            if result.refused:  # logged by the sealer; /readyz goes red while events wait
                time.sleep(max(5.0, options["interval"]))
            elif result.linked < batch:
                time.sleep(options["interval"])
        log.info("audit sealer stopped")
