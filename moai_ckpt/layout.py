"""The run directory's layout: every key below a run is built and parsed here, and only here.

::

    run.json                                        RUN_INFO: the run's identity (format.RunInfo)
    snapshots/<step:012d>/                          snapshot_dir: one zarr v3 group per snapshot
        zarr.json, <object>/zarr.json               group_key: group metadata
        <object>/<name>/zarr.json                   array_metadata_key: one zarr v3 array per tensor
        <object>/<name>/c.<i>.0...                  chunk_key: little-endian words, then a crc32c
                                                    (``c/<i>/0/...`` in snapshots written before)
        ranks/<rank:05d>.json                       rank_index_key: what one rank wrote
        manifest.json                               manifest_key: the state tree
        claim.json                                  claim_key: the writer writing this step
        commit.json                                 commit_key: the commit marker, written last
    log/<base:012d>/<first:012d>-<last:012d>.seg    log_segment_key: op-stream log records
    log/quarantine/<base:012d>/<segment>            quarantine_key: damaged segments set aside
    log/ops/<step:012d>/<label>/rank-<r:05d>/...    capture_key: op captures of one step
    lease/<epoch:012d>.json                         lease_key: the writer lease, one per epoch
    reports/replay-<stamp>-from-<base:012d>.json    replay_report_key: what each replay checked
    plans/profile-<device>-<hash>[-analytic].json   profile_key: cached model profiles
    events/<time_ns:020d>-<rank:05d>-<token>.json   event_key: one event of the run's history

Names are strict: a step or log directory is exactly twelve ASCII digits, a log segment
``<12 digits>-<12 digits>.seg``, a lease ``<12 digits>.json``; anything else below ``snapshots/``,
``log/`` or ``lease/`` is not ours and is ignored (with a warning, once). Keys are ``str``
relative to the run directory, ``/``-separated, in the alphabet of `moai_ckpt.keys`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from moai_ckpt.errors import UnsafeKeyError
from moai_ckpt.keys import sanitize_segment, warn_once

STEP_DIGITS = 12
RUN_INFO = "run.json"
SNAPSHOTS = "snapshots"
LOG = "log"
LEASE = "lease"
REPORTS = "reports"
PLANS = "plans"
EVENTS = "events"
MANIFEST = "manifest.json"
COMMIT = "commit.json"
CLAIM = "claim.json"
RANKS = "ranks"
ZARR_JSON = "zarr.json"
QUARANTINE = f"{LOG}/quarantine"
OPS = f"{LOG}/ops"
#: the objects of one op capture: its index (written last: it commits the others) and its data
CAPTURE_INDEX, CAPTURE_STREAM, CAPTURE_VALUES = "capture.json", "stream.json", "values.bin"

_STEP_NAME = re.compile(r"[0-9]{12}", re.ASCII)
_SEGMENT_NAME = re.compile(r"([0-9]{12})-([0-9]{12})\.seg", re.ASCII)
_LEASE_NAME = re.compile(r"([0-9]{12})\.json", re.ASCII)
_DOTTED_CHUNK = re.compile(r"c(\.[0-9]+)*", re.ASCII)
_LABEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
_CAPTURE_RANK = re.compile(r"^rank-(\d{5})$")
_EVENT_NAME = re.compile(r"([0-9]{20})-([0-9]{5})-([0-9a-f]{8})\.json", re.ASCII)
_REPLAY_REPORT = re.compile(r"replay-.+-from-[0-9]{12}\.json", re.ASCII)
#: names below ``log/`` that are ours but not a log
_LOG_NON_STEPS = frozenset({QUARANTINE.rsplit("/", 1)[1], OPS.rsplit("/", 1)[1]})


def _digits(number: int) -> str:
    return f"{number:0{STEP_DIGITS}d}"


# -- steps and snapshots -----------------------------------------------------------------------


def snapshot_dir(step: int) -> str:
    """The folder of the snapshot at ``step``; `ValueError` outside [0, 1e12)."""
    if step < 0 or step >= 10**STEP_DIGITS:
        raise ValueError(f"step must be in [0, 1e{STEP_DIGITS}), got {step}")
    return f"{SNAPSHOTS}/{_digits(step)}"


def parse_step_name(name: str) -> int | None:
    """The step a directory name spells (exactly twelve ASCII digits), or None.

    ``str.isdigit`` is not enough: ``"00000000001\u00b2"`` is "digits" to it, yet no step.
    """
    return int(name) if _STEP_NAME.fullmatch(name) else None


def parse_snapshot_dir(name: str) -> int | None:
    """The step of a ``snapshots/`` entry, or None for anything that is not one."""
    return parse_step_name(name)


def snapshot_step_of(key: str) -> int | None:
    """The step of the snapshot a key lies in (``snapshots/<step>/...``), or None."""
    parts = key.split("/", 2)
    return parse_step_name(parts[1]) if len(parts) > 1 and parts[0] == SNAPSHOTS else None


def in_snapshot(step: int, relative: str) -> str:
    """The key of ``relative`` (a path below the snapshot folder, e.g. an array's) in the snapshot at ``step``."""
    return f"{snapshot_dir(step)}/{relative}"


def commit_key(step: int) -> str:
    """The commit marker: a snapshot exists if and only if this object exists and validates."""
    return f"{snapshot_dir(step)}/{COMMIT}"


def manifest_key(step: int) -> str:
    return f"{snapshot_dir(step)}/{MANIFEST}"


def claim_key(step: int) -> str:
    """The claim a writer makes, by exclusive create, before it writes anything of ``step``."""
    return f"{snapshot_dir(step)}/{CLAIM}"


def rank_index_key(step: int, rank: int) -> str:
    return f"{snapshot_dir(step)}/{RANKS}/{rank:05d}.json"


def group_key(step: int, group: str = "") -> str:
    """The ``zarr.json`` of the snapshot's root group, or of the sub-group of one state entry."""
    return f"{snapshot_dir(step)}/{group}/{ZARR_JSON}" if group else f"{snapshot_dir(step)}/{ZARR_JSON}"


def array_metadata_key(step: int, array: str) -> str:
    """The ``zarr.json`` of an array (``array`` is its path below the snapshot, e.g. ``model/w``)."""
    return in_snapshot(step, f"{array}/{ZARR_JSON}")


def chunk_name(index: tuple[int, ...], separator: str) -> str:
    """zarr v3's ``default`` chunk key of the chunk at grid ``index`` below its array:
    ``c.0.0`` with the ``"."`` separator, ``c/0/0`` with ``"/"``, ``c`` for a 0-d array."""
    return "c" if not index else "c" + separator + separator.join(str(i) for i in index)


def chunk_key(step: int, array: str, index: tuple[int, ...], separator: str) -> str:
    """A chunk object of ``array`` (its path below the snapshot), keyed as `chunk_name` says."""
    return in_snapshot(step, f"{array}/{chunk_name(index, separator)}")


def is_chunk_key(key: str) -> bool:
    """Whether a key names a chunk of an array in a snapshot (zarr v3's default chunk key
    encoding, with either separator)."""
    parts = key.split("/")
    if snapshot_step_of(key) is None or len(parts) < 4 or parts[-1] == ZARR_JSON:
        return False
    return "c" in parts[3:-1] or _DOTTED_CHUNK.fullmatch(parts[-1]) is not None


def steps_in(names: Iterable[str], where: str, *, ignore: Iterable[str] = ()) -> list[int]:
    """Steps of the entries of a ``snapshots/`` or ``log/`` listing, ascending.

    Anything that is not a twelve-digit name is ignored with a warning (once per name), apart
    from the names in ``ignore`` that are known to live there.
    """
    skip = set(ignore)
    steps = []
    for name in names:
        step = parse_step_name(name)
        if step is not None:
            steps.append(step)
        elif name not in skip:
            warn_once(where, name, f"not a step (steps are {STEP_DIGITS} ASCII digits)")
    return sorted(steps)


def snapshot_steps(names: Iterable[str], url: str) -> list[int]:
    """Steps of a ``snapshots/`` listing (see `steps_in`)."""
    return steps_in(names, f"{url}/{SNAPSHOTS}")


# -- the op-stream log -------------------------------------------------------------------------


def log_dir(base_step: int) -> str:
    """The folder of the log records that follow the snapshot at ``base_step``."""
    return f"{LOG}/{_digits(base_step)}"


def log_segment_key(base_step: int, first: int, last: int) -> str:
    return f"{log_dir(base_step)}/{_digits(first)}-{_digits(last)}.seg"


def parse_log_segment(name: str) -> tuple[int, int] | None:
    """(first, last) step of a log segment's file name, or None for anything else."""
    m = _SEGMENT_NAME.fullmatch(name)
    if m is None or int(m.group(1)) > int(m.group(2)):
        return None
    return int(m.group(1)), int(m.group(2))


def log_base_steps(names: Iterable[str], url: str) -> list[int]:
    """Base steps of a ``log/`` listing (see `steps_in`)."""
    return steps_in(names, f"{url}/{LOG}", ignore=_LOG_NON_STEPS)


def quarantine_dir(base_step: int) -> str:
    """Where the damaged segments of the log after ``base_step`` are set aside."""
    return f"{QUARANTINE}/{_digits(base_step)}"


def quarantine_key(key: str) -> str:
    """Where a damaged log segment (or the folder of its log) is set aside:
    ``log/<base>/<name>`` -> ``log/quarantine/<base>/<name>``."""
    return f"{QUARANTINE}/{key.split('/', 1)[1]}"


# -- op captures -------------------------------------------------------------------------------


def check_label(label: str) -> str:
    """``label`` if it may name an op capture, else `UnsafeKeyError`."""
    if not _LABEL.match(label):
        raise UnsafeKeyError(f"capture label {label!r} must match {_LABEL.pattern}")
    return label


def is_capture_label(name: str) -> bool:
    return _LABEL.match(name) is not None


def capture_step_dir(step: int) -> str:
    return f"{OPS}/{_digits(step)}"


def capture_dir(step: int, label: str, rank: int | None = None) -> str:
    """The folder of one capture of ``step`` (of one rank's part of it, given ``rank``)."""
    if not 1 <= step < 10**STEP_DIGITS:
        raise ValueError(f"a captured step must be in [1, 1e{STEP_DIGITS}), got {step}")
    folder = f"{capture_step_dir(step)}/{check_label(label)}"
    return folder if rank is None else f"{folder}/rank-{rank:05d}"


def capture_key(step: int, label: str, rank: int, name: str) -> str:
    """One object of a rank's capture: `CAPTURE_INDEX`, `CAPTURE_STREAM` or `CAPTURE_VALUES`."""
    return f"{capture_dir(step, label, rank)}/{name}"


def parse_capture_rank(name: str) -> int | None:
    """The rank a capture's ``rank-<r:05d>`` folder names, or None."""
    m = _CAPTURE_RANK.match(name)
    return int(m.group(1)) if m is not None else None


# -- the writer lease --------------------------------------------------------------------------


def lease_key(epoch: int) -> str:
    if epoch < 1 or epoch >= 10**STEP_DIGITS:
        raise ValueError(f"a lease epoch must be in [1, 1e{STEP_DIGITS}), got {epoch}")
    return f"{LEASE}/{_digits(epoch)}.json"


def parse_lease_key(key: str) -> int | None:
    """The epoch of a ``lease/`` object's key, or None for anything else."""
    folder, _, name = key.rpartition("/")
    m = _LEASE_NAME.fullmatch(name)
    return int(m.group(1)) if folder == LEASE and m is not None and int(m.group(1)) >= 1 else None


# -- reports and plans -------------------------------------------------------------------------


def replay_report_key(stamp: str, base_step: int) -> str:
    """The report of a replay from the snapshot at ``base_step``; ``stamp`` orders reports in time."""
    return f"{REPORTS}/replay-{stamp}-from-{_digits(base_step)}.json"


def is_replay_report(name: str) -> bool:
    """Whether a file name below ``reports/`` is a replay report."""
    return _REPLAY_REPORT.fullmatch(name) is not None


def profile_key(device_type: str, model_hash: str, *, analytic: bool = False) -> str:
    """``plans/profile-<device type>-<model hash>[-analytic].json`` (the type made key-safe)."""
    return f"{PLANS}/profile-{sanitize_segment(device_type)}-{model_hash}{'-analytic' if analytic else ''}.json"


def is_profile_key(key: str) -> bool:
    return key.startswith(f"{PLANS}/profile-") and key.endswith(".json")


# -- the run's history of events -----------------------------------------------------------------


def event_key(time_ns: int, rank: int, token: str) -> str:
    """``events/<time_ns:020d>-<rank:05d>-<token>.json``: names sort by time; ``token`` is 8 hex digits."""
    if not 0 <= time_ns < 10**20 or not 0 <= rank < 10**5 or not re.fullmatch(r"[0-9a-f]{8}", token):
        raise ValueError(f"no event key for time {time_ns}, rank {rank}, token {token!r}")
    return f"{EVENTS}/{time_ns:020d}-{rank:05d}-{token}.json"


def parse_event_name(name: str) -> int | None:
    """The time (ns since the epoch) an ``events/`` entry's name spells, or None for anything else."""
    m = _EVENT_NAME.fullmatch(name)
    return int(m.group(1)) if m is not None else None
