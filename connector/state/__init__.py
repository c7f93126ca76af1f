"""The sync tables: what was delivered, what each run and batch did, what failed.

One module a table (or a concept), each stating its table's rules where its code is:

- ``schema``: every table's columns, ``ddl``, ``connect`` (the tables at this release's
  schema, by the Alembic revisions in ``connector/migrations``);
- ``plans``: ``sync_plan``, a run's staged changes and their state machine
  (pending -> out -> sending -> delivered / failed -> deleted; a dead run settled once);
- ``snapshots``: ``sync_snapshot``, what each user was last delivered;
- ``failed``: ``sync_failures``, the open failures (a user, or one set-aside attribute);
- ``history``: ``sync_runs``, ``sync_batches``, ``sync_cursors``, ``sync_mappings``;
- ``lease``: ``sync_locks``, the lock as a lease with fencing.

``from connector import state`` gives the public names of all of them.
"""

from connector.db import dumps, loads, make_engine, now
from connector.state.failed import (WHOLE, clear_failures, clear_unmapped, count_by_class, failed_identities,
                                    failure_keys, open_failures, record_failures, set_aside)
from connector.state.history import (FINALIZED, decode_watermark, encode_watermark, get_mapping, get_run,
                                     get_watermark, record_run, remember_mapping, set_watermark, show_watermark, start_run,
                                     update_run)
from connector.state.lease import (Lease, LeaseLost, Locked, acquire_lock, clock, fence, fenced, heartbeat, owner,
                                   release_lock)
from connector.state.plans import STAGED, PlanRow, stage, staged_rows
from connector.state.schema import (batches, connect, cursors, ddl, failures, locks, mappings, metadata, plan, runs,
                                    snapshot)
from connector.state.snapshots import (UNKNOWN, snapshot_from_plan, snapshot_hashes, snapshot_rows,
                                       upsert_snapshot)
