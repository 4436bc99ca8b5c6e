"""Command line: ``triage-node serve | receive | work | status | echo | check-config | retry |
classify | pull | resend | labels import | performance | drift | promote``.

``--config`` and ``--debug`` go before or after the command; without ``--config`` the file is
``$TRIAGE_CONFIG``, else ``config.yaml`` (``node.config.config_path``).  Exit codes: 0 done,
1 the command failed, 2 invalid configuration or model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

from node import __version__
from node.config import CONFIG_ENV, Settings, config_path, load_settings
from node.errors import ConfigError, ModelError, NodeError

logger = logging.getLogger(__name__)


def configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet = logging.INFO if debug else logging.WARNING
    for name in (
        "pynetdicom",
        "apscheduler",
        "tensorflow",
        "absl",
        "h5py",
        "PIL",
        "highdicom",
        "alembic",  # node.db.migrate logs the migration itself
    ):
        logging.getLogger(name).setLevel(quiet)
    # "skipped: maximum number of running instances reached" is the expected, harmless outcome of
    # a tick arriving while a long job runs (max_instances=1).
    logging.getLogger("apscheduler.scheduler").setLevel(logging.DEBUG if debug else logging.ERROR)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "port", None):
        overrides["node.port"] = args.port
    if getattr(args, "ae_title", None):
        overrides["node.ae_title"] = args.ae_title
    return load_settings(config_path(getattr(args, "config", None)), overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import serve

    settings = _settings(args)
    logger.info("triage-node %s, effective settings: %s", __version__, settings.model_dump_json())
    receive, work = {"serve": (True, True), "receive": (True, False), "work": (False, True)}[
        args.command
    ]
    serve(settings, receive=receive, work=work)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from node.challenger import check_challenger
    from node.model_spec import load_spec

    spec = load_spec(settings.model_dir)
    challenger = check_challenger(settings)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    print(f"config OK; model {spec.name} {spec.version} classes {spec.classes}", file=sys.stderr)
    if challenger:
        print(f"challenger {challenger} (shadow: recorded, never sent)", file=sys.stderr)
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import build_context
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.scu import associate

    settings = _settings(args)
    peer = settings.peer(args.peer)
    where = f"echo {peer.name} ({peer.ae_title}@{peer.host}:{peer.port})"
    try:
        with associate(
            peer, [build_context(Verification)], calling_ae=settings.node.ae_title, timeout_s=10
        ) as assoc:
            status = assoc.send_c_echo()
    except NodeError as exc:  # the association did not open: scu says why
        print(f"{where}: {exc}")
        return 1
    code = int(status.Status) if status is not None and "Status" in status else -1
    print(f"{where}: status 0x{code:04X}")
    return 0 if code == 0 else 1


def cmd_status(args: argparse.Namespace) -> int:
    from node.drift import current_warning
    from node.service import open_state
    from node.status import collect_status, format_status

    settings = _settings(args)
    report = collect_status(settings, limit=args.limit)
    report["drift_warning"] = current_warning(open_state(settings)[0])
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_status(report, now=dt.datetime.now(dt.UTC).replace(tzinfo=None)))
        if report["drift_warning"]:
            print(f"\nWARNING drift: {report['drift_warning']}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from node import jobs
    from node.service import open_state

    sessions, _ = open_state(_settings(args))
    if jobs.retry(sessions, args.job):
        print(f"job {args.job} requeued")
        return 0
    print(f"job {args.job} is not failed (only dead-lettered jobs can be retried)")
    return 1


def cmd_classify(args: argparse.Namespace) -> int:
    from node.classify import classify_paths

    settings = _settings(args)
    model_dir = Path(args.model) if args.model else settings.model_dir
    results = classify_paths([Path(p) for p in args.paths], settings, model_dir, out_dir=args.out)
    for result in results:
        print(json.dumps(result))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from node.pull import pull_study

    settings = _settings(args)
    count = pull_study(
        settings, study_uid=args.study, accession=args.accession, peer_name=args.peer
    )
    print(f"retrieved {count} instance(s)")
    return 0 if count > 0 else 1


def _iso_datetime(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date") from exc
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


def cmd_resend(args: argparse.Namespace) -> int:
    from node import jobs
    from node.service import open_state

    settings = _settings(args)
    sessions, _ = open_state(settings)
    ids = jobs.resend_shadowed(sessions, args.since)
    print(f"{len(ids)} shadow result(s) since {args.since.isoformat()} queued for delivery")
    if ids and settings.results.mode == "shadow":
        print("results.mode is still shadow: they will be withheld again", file=sys.stderr)
    return 0


def cmd_labels_import(args: argparse.Namespace) -> int:
    from node.labels import import_labels
    from node.service import open_state

    sessions, _ = open_state(_settings(args))
    result = import_labels(sessions, Path(args.file))
    print(f"labels: {result.added} new, {result.changed} changed, {result.unchanged} unchanged")
    return 0


def cmd_performance(args: argparse.Namespace) -> int:
    from node.performance import collect_performance, format_performance
    from node.service import open_state

    sessions, _ = open_state(_settings(args))
    report = collect_performance(sessions)
    print(json.dumps(report, indent=2) if args.json else format_performance(report))
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from node.drift import format_report, latest_report, run_drift
    from node.model_spec import load_spec
    from node.service import open_state

    settings = _settings(args)
    sessions, _ = open_state(settings)
    report = (
        run_drift(sessions, load_spec(settings.model_dir), settings.drift)
        if args.run
        else latest_report(sessions)
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from node.challenger import describe, promote

    print(describe(promote(config_path(getattr(args, "config", None)), retire=args.retire)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --config and --debug are accepted before and after the command: on the main parser and,
    # through ``common``, on every sub-command (SUPPRESS: an absent option never overwrites one
    # given on the other side of the command).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"path to config.yaml (default: ${CONFIG_ENV}, else ./config.yaml)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="verbose logs incl. pynetdicom",
    )
    parser = argparse.ArgumentParser(
        prog="triage-node",
        description=__doc__,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve", parents=[common], help="receive, analyse and report (runs until stopped)"
    )
    p.add_argument("--port", type=int, help="override node.port")
    p.add_argument("--ae-title", help="override node.ae_title")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "receive",
        parents=[common],
        help="only receive: store, complete series, queue jobs (runs until stopped)",
    )
    p.add_argument("--port", type=int, help="override node.port")
    p.add_argument("--ae-title", help="override node.ae_title")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "work",
        parents=[common],
        help="only work: analyse, report, deliver queued jobs; run any number (until stopped)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "status", parents=[common], help="series and jobs with states, counts and ages"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a configured peer")
    p.add_argument("peer")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser(
        "check-config", parents=[common], help="validate config.yaml and the model, print settings"
    )
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("retry", parents=[common], help="requeue a failed (dead-lettered) job")
    p.add_argument("job", type=int)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser(
        "classify",
        parents=[common],
        help="offline analysis of DICOM files/folders; JSON per series",
    )
    p.add_argument("paths", nargs="+")
    p.add_argument("--model", help="model directory (default: model_dir from config)")
    p.add_argument(
        "--out",
        "--sr-out",
        dest="out",
        type=Path,
        help="write each series' result objects (SR, key images, summary image + PNG, text SR) "
        "into this folder",
    )
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser(
        "pull", parents=[common], help="C-FIND + C-GET (or C-MOVE) a study from a peer"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", help="Study Instance UID")
    g.add_argument("--accession", help="Accession Number")
    p.add_argument("--peer", help="peer name (default: the results peer)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "resend", parents=[common], help="send the results shadow mode withheld since a date"
    )
    p.add_argument("--since", type=_iso_datetime, required=True, help="ISO date or date-time")
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("labels", parents=[common], help="ground-truth labels")
    labels = p.add_subparsers(dest="labels_command", required=True)
    p = labels.add_parser(
        "import", parents=[common], help="import labels from CSV (all rows or none)"
    )
    p.add_argument("file")
    p.set_defaults(func=cmd_labels_import)

    p = sub.add_parser(
        "performance", parents=[common], help="sensitivity, specificity, AUC on labelled series"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_performance)

    p = sub.add_parser(
        "drift", parents=[common], help="latest comparison of inputs and scores with model.json"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--run", action="store_true", help="compare now (and store) first")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser(
        "promote",
        parents=[common],
        help="make challenger_model_dir the live model in config.yaml (then restart)",
    )
    p.add_argument(
        "--retire",
        action="store_true",
        help="set challenger_model_dir to null (default: the former live model becomes it)",
    )
    p.set_defaults(func=cmd_promote)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "debug", False))
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ModelError as exc:
        print(f"model error: {exc}", file=sys.stderr)
        return 2
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
