"""``synth-ood`` command line: run, status, verify, presets.

``run`` executes the Prefect flow with Prefect's local ephemeral API (no server to start);
``status`` and ``verify`` read the output folder only and never import Prefect. Every failure
is one ``synth-ood: ...`` line on stderr (exit 2: refused before any work, 1: the run failed);
``--debug`` prints the traceback above it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from ood_core.config import ConfigError, available_presets, load_config, parse_overrides


def _stages(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


def failure_line(err: BaseException, out: str | None = None) -> str:
    """``synth-ood: ...``: what failed (the stage, shard and folder for a shard) and what to do, on one line."""
    try:
        from ood_core.models import RetryableError
        from ood_core.pipeline import shard_failure

        text, passing = shard_failure(err), isinstance(err, RetryableError)
    except Exception:  # noqa: BLE001 - the message must come out whatever is broken
        text, passing = None, False
    if text is None:
        text = str(err) or type(err).__name__
        if isinstance(err, OSError) and err.errno == errno.ENOSPC and text.startswith("[Errno"):
            text = (err.strerror or text) + (f": {err.filename}" if err.filename else "")  # the words say it
        # our own errors are written for users; a library's needs its type to make sense
        elif not type(err).__module__.startswith(("ood_core", "flows", "tasks")):
            text = f"{type(err).__name__}: {text}"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC and out and out not in text:
        text += f"; free space under {out} and rerun the same command (finished shards are kept)"
    if passing:  # without Prefect's task retries, the user is the retry
        text += "; it may pass: rerun the same command to resume (finished shards are kept)"
    from ood_core.secrets import scrub  # a library's message may hold a URL with its password

    return "synth-ood: " + scrub(" ".join(line.strip() for line in text.splitlines() if line.strip()))


def _fail(err: BaseException, args: argparse.Namespace, code: int) -> int:
    """Report ``err`` (its traceback first with ``--debug``) and return the exit code."""
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    out = getattr(args, "out", None) or getattr(args, "dir", None)
    if code == 2:  # refusals before any work are written as a whole (a preflight lists each problem)
        print(f"synth-ood: {err}", file=sys.stderr)
    else:
        print(failure_line(err, out) + ("" if getattr(args, "debug", False) else " (--debug: traceback)"),
              file=sys.stderr)
    return code


class _NoTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, without its traceback (the record keeps it for other handlers)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def console_without_tracebacks(logger: logging.Logger | None = None) -> None:
    """Prefect's console lines keep their message but print no traceback: the CLI ends with its one
    line (``--debug`` keeps them). Prefect's API log handler, and so the UI, still gets them."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in (logger or logging.getLogger()).handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _NoTraceback):
            handler.setFormatter(_NoTraceback(handler.formatter))


def cmd_run(args: argparse.Namespace) -> int:
    from ood_core.pipeline import StageNotReady, check_upstream_ready, selected_stages

    out = os.path.abspath(args.out) if "://" not in args.out else args.out
    try:
        overrides = parse_overrides(args.set)
        if args.round:
            from ood_core.rounds import resolve_round

            overrides["generate.round"] = resolve_round(args.round)
        cfg = load_config(args.preset, overrides)  # validate before any work or Prefect start-up
        from ood_core.rounds import check_keep_last

        check_keep_last(cfg.finetune.rounds_window, args.keep_last)
        selected_stages(_stages(args.only), _stages(args.force))
        # a missing upstream is one line here, not a failed flow run with Prefect's traceback
        check_upstream_ready(cfg, out, _stages(args.only), _stages(args.force))
    except (ConfigError, StageNotReady, ValueError) as err:
        return _fail(err, args, 2)
    from ood_core.preflight import PreflightError, preflight

    try:
        preflight(cfg, out)  # seconds, before any model load or Prefect start-up
    except PreflightError as err:
        return _fail(err, args, 2)
    if args.no_prefect:
        from ood_core.data import DataError
        from ood_core.pipeline import run_local

        try:
            results = run_local(cfg, out, _stages(args.only), _stages(args.force), check=False,
                                keep_last=args.keep_last)
        except (StageNotReady, DataError) as err:
            return _fail(err, args, 2)
    else:
        from flows.local_api import configure_local_api, local_api_notice, uses_local_api

        configure_local_api()
        if uses_local_api():
            print(local_api_notice(), flush=True)
        from flows.synth_ood import synth_ood

        if not getattr(args, "debug", False):
            console_without_tracebacks()
        try:
            results = synth_ood(
                preset=args.preset, out=out, only=_stages(args.only), force=_stages(args.force), overrides=overrides,
                keep_last=args.keep_last, shards_per_task=args.shards_per_task,
            )
        except StageNotReady as err:
            return _fail(err, args, 2)
    _print_summary(results, out)
    return 0


def _print_summary(results: dict, out: str) -> None:
    from ood_core.storage import StageStore, format_counts

    print(f"\nsynth-ood: outputs in {out}")
    for name, info in results.items():
        print(f"  {name:<10} {info['rows']:>6} rows  {format_counts(info['counts'])}")
    fin = results.get("finetune", {}).get("summary", {})
    if fin.get("metrics"):
        print(f"\n  OOD detection (average over OOD sets, convention: {fin['convention']})")
        for method, per_set in fin["metrics"].items():
            avg = per_set["average"]
            print(f"    {method:<10} FPR95 {100 * avg['fpr95']:6.2f}   AUROC {100 * avg['auroc']:6.2f}")
        # from where the outputs are now: the recorded URL is where they were written (a copy moves)
        report = StageStore(out, "finetune", results["finetune"]["key"]).url() + "/artifacts/report.md"
        print(f"  report: {report}")


def cmd_status(args: argparse.Namespace) -> int:
    from ood_core.pipeline import read_plan, read_run_history, read_run_record
    from ood_core.stages import STAGE_ORDER
    from ood_core.storage import StageStore, count_by_kind, merge_counts

    record = read_run_record(args.dir)
    if record is None:
        print(f"synth-ood: no run recorded in {args.dir} (expected {args.dir}/_runs/latest.json)", file=sys.stderr)
        return 2
    history = read_run_history(args.dir)
    print(f"latest run in {args.dir} (preset {record['preset']}, {_when(record['time'])})")
    from ood_core.rounds import list_rounds

    rounds = list_rounds(args.dir)
    if rounds:
        latest = record["config"]["generate"].get("round", "")
        print("rounds: " + ", ".join(r["round"] + (" (latest run)" if r["round"] == latest else "") for r in rounds))
        from ood_core.rounds import round_metrics

        per_round = round_metrics(args.dir)
        if per_round:
            methods = [m for m in ("mcm", "neglabel", "synood", "mm_ood") if m in per_round[-1]["metrics"]]
            print("  metrics per round (FPR95 / AUROC %, average over the OOD sets):")
            print("    " + f"{'round':<12}" + "".join(f"{m:>18}" for m in methods))
            for r in per_round:
                cells = [f"{100 * r['metrics'][m]['fpr95']:6.2f} / {100 * r['metrics'][m]['auroc']:6.2f}"
                         if m in r["metrics"] else "–" for m in methods]  # fmt: skip
                print("    " + f"{r['round']:<12}" + "".join(f"{c:>18}" for c in cells))
    for name in STAGE_ORDER:
        store = StageStore(args.dir, name, record["keys"][name])
        if store.is_complete():
            info = store.read_success()
            state, counts = "done", info["counts"]
            detail = f"{info['shards']} shards, {info['rows']} rows"
        else:
            done = store.shard_indices()
            counts = merge_counts([store.shard_stats(i)["counts"] for i in done])
            plan = read_plan(store)
            total = plan["shards"] if plan else "?"
            state = "partial" if done or plan else "missing"
            detail = f"{len(done)}/{total} shards"
        print(f"  {name:<10} {state:<8} {store.key}  {detail}")
        if state != "done":
            _print_last_complete(args.dir, name, history)
        for status, reasons in sorted(counts.items()):
            print(f"      {status:<9} {sum(reasons.values()):>6}  " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
        for kind, by_status in sorted(count_by_kind(store).items()):
            parts = [f"{st} {sum(r.values())} (" + ", ".join(f"{k}={v}" for k, v in sorted(r.items())) + ")"
                     for st, r in sorted(by_status.items())]
            print(f"      kind {kind}: " + "; ".join(parts))
        bad = store.read_success().get("bad_inputs") if state == "done" else None
        if bad:
            print(f"      {'bad input':<9} {sum(bad.values()):>6}  " + ", ".join(f"{k}={v}" for k, v in bad.items())
                  + f"  (list: {store.path('bad_inputs.parquet')})")
    _print_history(args.dir, history)
    return 0


def _when(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _print_last_complete(root: str, name: str, history: list[dict]) -> None:
    """The newest earlier run whose folder of this stage is complete (a failed run hides nothing)."""
    from ood_core.storage import StageStore

    for rec in history[1:]:
        key = rec.get("keys", {}).get(name)
        if key and StageStore(root, name, key).is_complete():
            print(f"      last complete: {key} from the run of {_when(rec['time'])} (preset {rec['preset']})")
            return


def _print_history(root: str, history: list[dict]) -> None:
    from ood_core.stages import STAGE_ORDER
    from ood_core.storage import StageStore

    if not history:
        return
    print(f"run history ({len(history)} run(s), newest first):")
    for rec in history[:10]:
        done = [n for n in STAGE_ORDER if n in rec["keys"] and StageStore(root, n, rec["keys"][n]).is_complete()]
        print(f"  {_when(rec['time'])}  preset {rec['preset']:<10} complete: {', '.join(done) or 'none'}")


def cmd_verify(args: argparse.Namespace) -> int:
    from ood_core.stages import STAGE_ORDER
    from ood_core.storage import list_stage_runs

    problems: list[str] = []
    incomplete: list[str] = []
    checked = 0
    for name in STAGE_ORDER:
        for store in list_stage_runs(args.dir, name):
            checked += 1
            if store.is_complete():
                problems += store.verify()
            else:
                # interrupted or in progress: not an inconsistency, but its finished shards must be intact
                incomplete.append(store.url())
                for i in store.shard_indices():
                    problems += store.shard_problems(i)
    if checked == 0:
        print(f"synth-ood verify: no stage folders under {args.dir}", file=sys.stderr)
        return 1
    if incomplete:
        print(f"synth-ood verify: {len(incomplete)} incomplete stage folder(s) (finished shards checked):")
        for url in incomplete:
            print(f"  {url}")
    if problems:
        print(f"synth-ood verify: {len(problems)} problem(s) in {checked} stage folder(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"synth-ood verify: {checked} stage folder(s) consistent")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from ood_core.world.build import main as world_main

    return world_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synth-ood", description=__doc__.splitlines()[0])
    debug_help = "on a failure, print the traceback above the one-line message"
    p.add_argument("--debug", action="store_true", help=debug_help)
    # also after the command (`synth-ood run --debug`); SUPPRESS keeps the one given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run or resume the pipeline", parents=[common])
    r.add_argument("--preset", default="tiny", help=f"one of {', '.join(available_presets())}, or a YAML path")
    r.add_argument("--out", default="runs/tiny", help="output root (local path or fsspec URL)")
    r.add_argument("--only", action="append", help="run only these stages (comma-separated)")
    r.add_argument("--force", action="append", help="recompute these stages (comma-separated)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. generate.rounds=2")
    r.add_argument("--round", help="generation round (new data per round, sketch reused); @date = today (UTC)")
    r.add_argument("--keep-last", type=int, metavar="K", help="with --round: prune all but the last K rounds' folders")
    r.add_argument("--shards-per-task", type=int, default=1, metavar="N",
                   help="under Prefect: N shards per task run (small shards; default 1)")
    r.add_argument("--no-prefect", action="store_true", help="run in-process without Prefect (debugging)")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="per stage: done / partial / missing, counts by status and reason",
                       parents=[common])
    s.add_argument("dir")
    s.set_defaults(func=cmd_status)
    v = sub.add_parser("verify", help="re-hash every shard and manifest against its stats file", parents=[common])
    v.add_argument("dir")
    v.set_defaults(func=cmd_verify)
    w = sub.add_parser("world", help="build or show the trained world models (`synth-ood world build -h`)", add_help=False)
    w.add_argument("rest", nargs=argparse.REMAINDER)
    w.set_defaults(func=cmd_world)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; any failure is one ``synth-ood:`` line and a non-zero exit, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("synth-ood: interrupted; rerun the same command to resume (finished shards are kept)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, the traceback on --debug
        return _fail(err, args, 1)


def entry() -> None:
    """The ``synth-ood`` command: :func:`main`, then exit without interpreter finalization.

    pyarrow's native thread pools can abort a finished process while Python tears down its
    modules ("terminate called without an active exception", exit -6; apache/arrow#34314), which
    turned a successful run into a failed command. Exit handlers (Prefect's temporary server,
    logging) still run; only the finalization that races those threads is skipped.
    """
    import atexit
    import os

    try:
        code = main()
    except SystemExit as exit_:  # argparse errors and --help
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, int | None):
            print(exit_.code, file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
