"""`uga` command line: segment, serve, runner, tokens, and commands that other installed packages plug in.

Entry points extend it, so this package imports nothing from ``models.data``:

- group ``uga.commands``: ``register(subparsers)`` adds subcommands (``models.data.commands`` adds
  make-slides and demo), each with ``set_defaults(func=...)``;
- group ``uga.demo_slide``, name ``build``: ``build(path)`` builds the demo slide for
  ``uga serve --demo-slide`` unless it exists.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service.config import LOOPBACK, Settings, bind_address, get_settings, settings_error
from service.errors import DomainError
from service.vocabulary import MEASURES, SCORINGS, SELECTIONS

if TYPE_CHECKING:
    from service.options import SegmentationOptions

EXIT_USAGE = 2
EXIT_STATUS = """settings: UGA_* environment variables (README, "Settings"); `uga COMMAND --help` for each command.

exit status:
  0    done
  1    the work itself failed: a fine-tune run (runner --once), an unhealthy runner (runner --check)
  2    refused: bad arguments or settings, an unusable slide, a store or path that cannot be used;
       one line on stderr says what was wrong and how to fix it, and nothing was made or changed
  130  interrupted (Ctrl+C)"""
COMMANDS_GROUP = "uga.commands"
DEMO_SLIDE_GROUP = "uga.demo_slide"


class CliError(Exception):
    """Shown as one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are the CLI's one line (no usage block): what was wrong and
    where to look."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(EXIT_USAGE, f"uga: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _within_setting(field: str, what: str) -> Callable[[str], int]:
    """An argparse type: an integer within the bounds of the setting ``field`` (one source of them)."""
    from service.config import Settings

    bounds = Settings.model_fields[field].metadata
    lo = next(b.ge for b in bounds if hasattr(b, "ge"))
    hi = next(b.le for b in bounds if hasattr(b, "le"))

    def parse(value: str) -> int:
        if not value.isdigit() or not lo <= int(value) <= hi:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what} ({lo}-{hi})")
        return int(value)

    return parse


def _ip_address(value: str) -> str:
    try:
        return bind_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return v


def add_segment_options(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    p.add_argument("--mpp", type=_positive, default=s.mpp, help=f"analysis µm/px (default {s.mpp})")
    p.add_argument("--slide-mpp", type=_positive, default=None, help="level-0 µm/px when the slide lacks it")
    p.add_argument("--queue", type=int, default=s.queue_size, help=f"review patches (default {s.queue_size})")
    p.add_argument("--patch-um", type=_positive, default=s.patch_um, help=f"patch side µm (default {s.patch_um:g})")
    p.add_argument("--uncertainty", choices=MEASURES, default=s.uncertainty)
    p.add_argument("--scoring", choices=SCORINGS, default=s.scoring, help="patch score")
    p.add_argument(
        "--selection", choices=SELECTIONS, default=s.selection, help="how the review queue picks its patches"
    )
    p.add_argument("--model", type=Path, default=s.baseline_dir, help="model version directory")
    p.add_argument("--tile", type=int, default=s.tile)
    p.add_argument("--batch", type=int, default=s.batch)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def segment_options(args: argparse.Namespace, out: Path) -> SegmentationOptions:
    """The segmentation options of ``args``, checked before any work (CliError / DomainError)."""
    from service.options import SegmentationOptions

    if args.queue < 1:
        raise CliError("--queue must be at least 1")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is not a directory (a file); give a directory, created if missing")
    return SegmentationOptions.resolve(
        get_settings(),
        {
            "mpp": args.mpp,
            "slide_mpp": args.slide_mpp,
            "tile": args.tile,
            "batch": args.batch,
            "uncertainty": args.uncertainty,
            "scoring": args.scoring,
            "selection": args.selection,
            "queue_size": args.queue,
            "patch_um": args.patch_um,
        },
    )


def run_segment(slide: Path, out: Path, args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from service.fsutil import ATTEMPT_PREFIX, publish_outputs
    from service.inference.ensemble import load_ensemble
    from service.inference.pipeline import run_segmentation
    from service.loop.jobs import check_work

    s = get_settings()
    opts = segment_options(args, out)
    ensemble = load_ensemble(args.model, providers=s.providers, threads=s.ort_threads)
    check_work(s, slide, opts)  # the service's limits: UGA_MAX_JOB_TILES, UGA_MAX_CORRECTION_PX
    bars: list[tqdm] = []  # created on the first tile, so refused input prints no bar

    def progress(done: int, total: int) -> None:
        if not bars:  # a log (stderr not a terminal) gets a line every 30 s, not 10 redraws a second
            every = 0.1 if sys.stderr.isatty() else 30.0
            bar = tqdm(
                total=total, unit="tile", desc=slide.name, disable=args.quiet, file=sys.stderr, mininterval=every
            )
            bars.append(bar)
        bars[0].update(done - bars[0].n)

    created = not out.exists()
    attempt = out / f"{ATTEMPT_PREFIX}{os.getpid()}"  # outputs move into --out only once all are written
    try:
        summary = run_segmentation(slide, attempt, ensemble, opts, progress=progress)
        publish_outputs(attempt, out)
        return summary
    finally:
        for bar in bars:
            bar.close()
        shutil.rmtree(attempt, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused or interrupted: nothing made


def print_summary(summary: dict, out: Path) -> None:
    q = summary["queue"]
    lines = [
        f"slide            {summary['slide']}  ({summary['slide_vendor']}, {summary['slide_mpp']} µm/px level 0)",
        f"model            {summary['model_version']}  ({summary['ensemble_members']} members, "
        f"{', '.join(summary['providers'])})",
        f"tissue / tumour  {summary['tissue_area_mm2']:.2f} mm² / {summary['tumour_area_mm2']:.2f} mm² "
        f"({100 * summary['tumour_fraction_of_tissue']:.1f}% of tissue)",
        "mean uncertainty " + ", ".join(f"{k} {v:.4f}" for k, v in summary["mean_uncertainty"].items()),
        f"tiles            {summary['tiles']['computed']} of {summary['tiles']['grid']} "
        f"({summary['throughput']['tissue_mp_per_s']:.2f} tissue MP/s, "
        f"{summary['timings_s']['wall_s']:.1f} s)",
        f"review queue     {q['size']} patches of {q['patch_um']:g} µm by {q['measure']} ({q['scoring']})",
        f"outputs          {out}/  (overlay.png, annotations.geojson, *.tif, queue.json, summary.json)",
    ]
    print("\n".join(lines))


def cmd_segment(args: argparse.Namespace) -> int:
    summary = run_segment(args.slide, args.out, args)
    print_summary(summary, args.out)
    return 0


def _demo_slide_builder() -> Callable[[Path], None]:
    """The installed ``uga.demo_slide`` builder, or a CliError saying that none is."""
    found = entry_points(group=DEMO_SLIDE_GROUP, name="build")
    if not found:
        raise CliError(f"--demo-slide: no demo slide builder installed (entry point {DEMO_SLIDE_GROUP}:build)")
    return next(iter(found)).load()


DEFAULT_USERS = ("admin", "annotator", "viewer")  # first-run users of `uga serve`, each with the role of its name


def _legacy_tokens_file(path: Path) -> bool:
    """True when ``path`` holds shared ``ROLE TOKEN`` lines (an earlier release's data/tokens), not named tokens."""
    from service.store.tokens import looks_like_token

    for raw in path.read_text().splitlines():
        fields = raw.split("#", 1)[0].replace(":", " ", 1).split()
        if len(fields) >= 2 and not looks_like_token(fields[1]):
            return True
    return False


def ensure_tokens(data_dir: Path, database_url: str | None = None) -> Path | None:
    """First-run convenience: named users admin, annotator and viewer (each with that role) in the store,
    their tokens in a 0600 ``data/tokens`` created with O_EXCL and never overwritten.

    Nothing is created when the file exists or the store already has tokens (an operator issued them).
    Returns the file when it holds an earlier release's shared role tokens, to be served as those; else None.
    """
    from service.store import Store

    path = data_dir / "tokens"
    if path.exists():
        return path if _legacy_tokens_file(path) else None
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir, database_url)
    issued: list[str] = []
    try:
        if store.tokens.count(active_only=False):
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another `uga serve` got there first
            return None
        try:
            with os.fdopen(fd, "w") as f:
                f.write("# NAME TOKEN: named users created by `uga serve`, each with the role of its name.\n")
                f.write("# Manage them with `uga tokens add|list|revoke`; this file is not read by the service.\n")
                for name in DEFAULT_USERS:
                    record, token = store.tokens.issue(name, name, actor="uga serve")
                    issued.append(record.id)
                    f.write(f"{name} {token}\n")
        except BaseException:  # no token nobody can read: take back what was issued, and the file
            for token_id in issued:
                store.tokens.revoke(token_id, actor="uga serve")
            path.unlink(missing_ok=True)
            raise
    finally:
        store.close()
    print(f"uga: created users {', '.join(DEFAULT_USERS)}; their API tokens are in {path}", file=sys.stderr)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """Run `bentoml serve` with the embedded defaults (local data dir, SQLite, shipped baseline)."""
    build_demo = _demo_slide_builder() if args.demo_slide else None
    s = get_settings()
    if s.auth_disabled and args.host not in LOOPBACK:
        raise CliError(
            f"UGA_AUTH_DISABLED=true makes every caller admin: serve on 127.0.0.1, not {args.host}, or configure tokens"
        )
    env = dict(os.environ)
    data_dir, slide_root = s.data_dir.resolve(), s.slide_root.resolve()
    if not _has_store(s) and not (s.baseline_dir / "card.json").is_file():  # a store with versions no longer needs it
        raise CliError(f"no model card in {s.baseline_dir}: set UGA_BASELINE_DIR to a model directory")
    if not _can_listen(args.host, args.port):  # before anything is made: users, tokens, the demo slide
        raise CliError(f"port {args.port} on {args.host} is in use (another `uga serve`?): pick another with --port")
    slide_root.mkdir(parents=True, exist_ok=True)
    env.update(UGA_DATA_DIR=str(data_dir), UGA_SLIDE_ROOT=str(slide_root), UGA_WORKERS=str(args.workers))
    if not (s.auth_tokens_file or s.auth_tokens or s.auth_disabled or s.oidc_issuer):
        legacy = ensure_tokens(data_dir, s.database_url)
        if legacy is not None:
            env["UGA_AUTH_TOKENS_FILE"] = str(legacy)
            print(
                f"uga: {legacy} holds shared role tokens, which record a role, not a person; "
                "issue personal ones with `uga tokens add NAME --role ROLE`",
                file=sys.stderr,
            )
    if build_demo:
        build_demo(slide_root / "demo-mixed.tif")
    bentoml_bin = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml_bin), "serve", "service.api:UGAService", "--host", args.host, "--port", str(args.port)]
    print(f"uga: serving on http://{args.host}:{args.port} (data {data_dir}, slides {slide_root})", file=sys.stderr)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def _has_store(settings: Settings) -> bool:
    """A PostgreSQL store is configured, or UGA_DATA_DIR holds a SQLite one (a typo holds none)."""
    return bool(settings.database_url) or (settings.data_dir / "uga.sqlite").exists()


def _can_listen(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (as bentoml will, with SO_REUSEADDR)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _token_store(create: bool):
    """The store of UGA_DATA_DIR; without ``create``, a missing store is an error, not a new empty one."""
    from service.store import Store

    settings = get_settings()
    data_dir = settings.data_dir
    if not create and not _has_store(settings):
        raise CliError(f"no store in {data_dir}: set UGA_DATA_DIR to the service's data directory")
    try:
        return Store.open(settings)
    except sqlite3.DatabaseError as exc:
        raise CliError(f"the store in {data_dir} cannot be read ({exc}); is uga.sqlite a service's store?") from None


def _operator() -> str:
    """Who ran the command, for the audit log."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment (some containers)
        return "cli"


def _when(t: float | None) -> str:
    import datetime as dt

    return "-" if t is None else dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_tokens_add(args: argparse.Namespace) -> int:
    from service.store.tokens import check_name, check_role

    if args.role is None:
        raise CliError("tokens add: --role is required (viewer, annotator or admin)")
    check_name(args.name)
    check_role(args.role)
    store = _token_store(create=True)
    try:
        record, token = store.tokens.issue(args.name, args.role, actor=_operator())
    finally:
        store.close()
    print(token)  # the only line on stdout: `TOKEN=$(uga tokens add ...)`
    print(f"uga: issued {record.role} token {record.id} for {record.name}; it is shown only this once", file=sys.stderr)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    store = _token_store(create=False)
    try:
        tokens = store.tokens.list(include_revoked=not args.active)
    finally:
        store.close()
    rows = [("NAME", "ROLE", "ID", "CREATED", "REVOKED", "LAST_USED")]
    rows += [(t.name, t.role, t.id, _when(t.created_at), _when(t.revoked_at), _when(t.last_used_at)) for t in tokens]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    store = _token_store(create=False)
    try:
        revoked = store.tokens.revoke(args.name_or_id, actor=_operator())
    finally:
        store.close()
    for t in revoked:
        print(f"revoked {t.id} ({t.name}, {t.role})")
    return 0


def cmd_store_copy(args: argparse.Namespace) -> int:
    """Copy the SQLite store of UGA_DATA_DIR into an empty PostgreSQL database."""
    from service.store import StoreError
    from service.store.copy import copy_store

    try:
        copied = copy_store(get_settings().data_dir, args.to)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    for table, n in copied.items():
        print(f"{table}\t{n}")
    print(f"uga: copied {sum(copied.values())} rows; now set UGA_DATABASE_URL", file=sys.stderr)
    return 0


def _add_store_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="the metadata store: copy the embedded SQLite store into PostgreSQL")
    ssub = p.add_subparsers(dest="store_command", required=True)
    q = ssub.add_parser("copy", help="copy UGA_DATA_DIR's SQLite store into an empty PostgreSQL database")
    q.add_argument("--to", required=True, metavar="postgresql://...", help="the target database's URL")
    q.set_defaults(func=cmd_store_copy)


def _add_tokens_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="named users' API tokens: add, list, revoke (in UGA_DATA_DIR's store)")
    tsub = p.add_subparsers(dest="tokens_command", required=True)
    q = tsub.add_parser("add", help="issue a token for a person; prints it once, on stdout")
    q.add_argument("name", help="the person (1-64 of A-Z a-z 0-9 . _ @ -): the actor in the audit log")
    q.add_argument("--role", default=None, help="viewer, annotator or admin (required)")
    q.set_defaults(func=cmd_tokens_add)
    q = tsub.add_parser("list", help="name, role, id, created, revoked, last used (never secrets)")
    q.add_argument("--active", action="store_true", help="only tokens that are not revoked")
    q.set_defaults(func=cmd_tokens_list)
    q = tsub.add_parser("revoke", help="revoke a token by id, or every token of a person by name")
    q.add_argument("name_or_id")
    q.set_defaults(func=cmd_tokens_revoke)


def cmd_runner(args: argparse.Namespace) -> int:
    """The fine-tune runner: its own process, one per deployment."""
    from importlib.util import find_spec

    from service.loop import runner

    if not args.check and find_spec("torch") is None:  # the serving install has no torch
        raise CliError("the runner fine-tunes with torch: pip install -e '.[cpu,train]' (or make runner)")

    s = get_settings()
    if args.check:
        ok, message = runner.check(s)
        print(message if ok else f"uga: error: runner unhealthy: {message}", file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if args.once and not _has_store(s):  # a typo, not a deployment
        raise CliError(f"no store in {s.data_dir}: set UGA_DATA_DIR to the service's data directory")
    return runner.main(s, once=args.once)


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands from ``uga.commands`` entry points; one that fails to load is skipped with a warning."""
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as exc:  # a broken plugin must not take segment/serve/runner down with it
            print(f"uga: warning: commands {ep.name!r} ({ep.value}) not loaded: {exc}", file=sys.stderr)
            continue
        register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="uga",
        description="Uncertainty-guided annotation for slides",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("segment", help="segment one slide: mask, uncertainty maps, ranked review queue")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_segment_options(p)
    p.set_defaults(func=cmd_segment)
    _add_plugin_commands(sub)  # after segment, so `uga -h` lists make-slides and demo where it always has
    s = get_settings()
    p = sub.add_parser("serve", help="start the HTTP service (bentoml serve) with embedded defaults")
    p.add_argument("--host", type=_ip_address, default=s.host, help="bind address (an IP address)")
    p.add_argument("--port", type=_within_setting("port", "a port"), default=s.port)
    p.add_argument("--workers", type=_within_setting("workers", "a number of workers"), default=s.workers)
    p.add_argument("--demo-slide", action="store_true", help="put a demo slide into the slide root first")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("runner", help="background fine-tune runner (corrections -> candidate -> gate -> promote)")
    p.add_argument("--once", action="store_true", help="do at most one pending run, then exit")
    p.add_argument("--check", action="store_true", help="liveness check for Kubernetes (exit 0 = healthy)")
    p.set_defaults(func=cmd_runner)
    _add_tokens_command(sub)
    _add_store_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from service.store import StoreError

    try:
        args = build_parser().parse_args(argv)  # the options' defaults come from the settings
        if args.command != "runner":  # a refused database: our one line, not its retries (the runner logs them)
            logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        return args.func(args)
    except (CliError, DomainError, StoreError) as exc:  # anything else is a bug: its traceback is shown
        print(f"uga: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:  # a setting in the environment is invalid
        print(f"uga: error: {settings_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.DatabaseError as exc:
        print(
            f"uga: error: the SQLite store failed ({exc}); is UGA_DATA_DIR a service's data directory?",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except OSError as exc:  # a path that is a file, read-only, missing: the environment, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"uga: error: {where}{exc.strerror or exc} (check UGA_DATA_DIR, UGA_SLIDE_ROOT and the paths given)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("uga: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so that plugins raising
    # service.cli.CliError are caught.
    from service import cli

    sys.exit(cli.main())
