"""``alphapulse`` command line: a thin layer that parses arguments and calls the package.

Exit codes: 0 success, 1 runtime failure, 2 usage error, 78 (EX_CONFIG) invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from alphapulse import __version__
from alphapulse.config import ConfigError, Settings, check_paths, load_settings, report_config_error

CONTROL_ACTIONS = ("emergency_stop", "flatten_positions", "maintenance_mode", "resume_trading")


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config_dir) if args.config_dir else None)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        settings = _load(args)
        check_paths(settings)
    except ConfigError as e:
        return report_config_error(e)

    from alphapulse.log import close_logging, configure_logging, get_logger, register_secrets

    configure_logging(settings.log_dir, settings.log_level, console=settings.log_console)
    register_secrets(settings.secrets())
    log = get_logger("alphapulse.cli")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a core dependency
        uvloop = None  # type: ignore[assignment]

    from alphapulse.control import ControlServerError
    from alphapulse.daemon import Daemon, StartupError

    async def main() -> int:
        return await Daemon(settings, exit_at_end=args.exit_at_end).run()

    try:
        if uvloop is not None:
            return uvloop.run(main())
        return asyncio.run(main())
    except ConfigError as e:
        log.error("config error", error=str(e))
        return report_config_error(e)
    except (ControlServerError, StartupError) as e:
        log.error("start-up failed", error=str(e))
        print(f"alphapulse: {e}", file=sys.stderr)
        return 1
    finally:
        close_logging()


def cmd_monitor(args: argparse.Namespace) -> int:
    """The monitoring service (alphapulse/monitor/): its own process next to the daemon."""
    from alphapulse.monitor.settings import LOG_PREFIX, load_monitor_settings

    try:
        settings = load_monitor_settings(Path(args.config_dir) if args.config_dir else None)
        check_paths_monitor(settings.daemon)
    except ConfigError as e:
        return report_config_error(e)

    from alphapulse.log import close_logging, configure_logging, register_secrets
    from alphapulse.monitor.service import main as monitor_main

    configure_logging(settings.daemon.log_dir, settings.daemon.log_level, console=settings.daemon.log_console,
                      file_prefix=LOG_PREFIX)
    register_secrets(settings.daemon.secrets())
    try:
        return monitor_main(settings)
    finally:
        close_logging()


def check_paths_monitor(s: Settings) -> None:
    """The monitor writes only under the data and log directories; unlike the daemon it needs no model or
    replay file (it must start, and alert, whatever state the daemon's files are in)."""
    for key, d in (("paths.data_dir", s.data_dir), ("paths.log_dir", s.log_dir)):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("config.yaml", key, f"cannot create directory {d}: {e.strerror or e}") from None
        if not os.access(d, os.W_OK):
            raise ConfigError("config.yaml", key, f"directory not writable: {d}")


def cmd_check_config(args: argparse.Namespace) -> int:
    from alphapulse.model_store import model_error, resolve_model
    from alphapulse.policy import ModelError, read_model_meta

    try:
        s = _load(args)
        check_paths(s)
        model_path, model_source = resolve_model(s)
        try:
            meta = read_model_meta(model_path)
        except ModelError as e:
            raise model_error(s, model_source, str(e)) from None
        if meta.timeframe != s.timeframe:
            raise ConfigError("trading_params.yaml", "timeframe",
                              f"{s.timeframe} but model {meta.version} was built for {meta.timeframe}")
        from alphapulse.builder import warmup_check

        enough, warmup = warmup_check(s, meta)
        if not enough:
            raise ConfigError("config.yaml", "feed.replay_file", warmup)
    except ConfigError as e:
        return report_config_error(e)
    print(f"config ok: mode={s.mode} symbol={s.symbol} timeframe={s.timeframe} data_dir={s.data_dir} "
          f"log_dir={s.log_dir} control={s.control_host}:{s.control_port}")
    print(f"model: {meta.version} from {model_path} ({model_source})")
    print(warmup)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    """Talk to a running daemon's control API (token from the environment or the state directory)."""
    try:
        s = _load(args)
    except ConfigError as e:
        return report_config_error(e)
    url = f"http://{s.control_host}:{s.control_port}/{args.action}"
    headers = {"Accept": "application/json"}
    method = "GET"
    if args.action in CONTROL_ACTIONS:
        method = "POST"
        token = s.control_token
        if not token:
            try:
                token = (s.data_dir / "control_token").read_text().strip()
            except OSError as e:
                print(f"alphapulse: no control token: set ALPHAPULSE_CONTROL_TOKEN or make "
                      f"{s.data_dir / 'control_token'} readable ({e.strerror})", file=sys.stderr)
                return 1
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(resp.read().decode())
            return 0
    except urllib.error.HTTPError as e:
        print(e.read().decode(), file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"alphapulse: cannot reach the daemon at {url}: {e.reason}", file=sys.stderr)
        return 1


def cmd_backtest(args: argparse.Namespace) -> int:
    from alphapulse.backtest_cli import backtest_main

    return backtest_main(args.rest)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from alphapulse.evaluation import evaluate_main

    return evaluate_main(args.rest)


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from alphapulse.training.train import train_main
    except ImportError as e:
        print(f"alphapulse train: the training extra is not installed ({e.name}); run: "
              f".venv/bin/pip install -e '.[train]'", file=sys.stderr)
        return 1
    return train_main(args.rest)


def cmd_report(args: argparse.Namespace) -> int:
    from alphapulse.report import report_main

    return report_main(args.rest)


def cmd_model(args: argparse.Namespace) -> int:
    from alphapulse.model_cli import model_main

    return model_main(args.rest)


def cmd_fetch(args: argparse.Namespace) -> int:
    from alphapulse.fetch import fetch_main

    return fetch_main(args.rest)


def cmd_health(args: argparse.Namespace) -> int:
    from alphapulse.ops.health import health_main

    return health_main(args.rest)


def cmd_backup(args: argparse.Namespace) -> int:
    from alphapulse.ops.backup_cli import backup_main

    return backup_main(args.rest)


def cmd_fake_weex(args: argparse.Namespace) -> int:
    from alphapulse.exchange.weex.fake import main as fake_main

    return fake_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alphapulse", description="AlphaPulse-RL trading daemon and tools")
    p.add_argument("--version", action="version", version=f"alphapulse {__version__}")
    p.add_argument("--config-dir", help="directory with config.yaml and trading_params.yaml "
                   "(default: $ALPHAPULSE_CONFIG_DIR, else ./config, else built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the trading daemon")
    run.add_argument("--exit-at-end", action="store_true", help="exit 0 when the replay ends instead of serving on")
    run.set_defaults(func=cmd_run)
    mon = sub.add_parser("monitor", help="the monitoring service: scrapes the daemon and the host, raises alerts, "
                         "serves them on 127.0.0.1:$ALPHAPULSE_MONITOR_PORT (8081)")
    mon.set_defaults(func=cmd_monitor)
    chk = sub.add_parser("check-config", help="validate the configuration and exit (78 when invalid)")
    chk.set_defaults(func=cmd_check_config)
    ctl = sub.add_parser("ctl", help="call the running daemon's control API")
    ctl.add_argument("action", choices=("health", "metrics") + CONTROL_ACTIONS)
    ctl.set_defaults(func=cmd_ctl)
    for name, func, text in (("backtest", cmd_backtest, "replay stored candles through the daemon's pipeline"),
                             ("evaluate", cmd_evaluate, "out-of-sample metrics against baselines; --validate"),
                             ("train", cmd_train, "train a policy and export it to ONNX (--walk-forward, --sweep)"),
                             ("report", cmd_report, "daily or weekly performance report with charts"),
                             ("model", cmd_model, "versioned models: list, promote (validated), rollback"),
                             ("fetch", cmd_fetch, "exchange checks (--test), data and store checks (--validate), "
                              "candle download"),
                             ("health", cmd_health, "is the service fit to trade? service, control API, monitor, "
                              "feed, model, store, disk, clock, backup; exit 0 healthy, 1 degraded, 2 failing"),
                             ("backup", cmd_backup, "backups: create, list, verify, restore (daemon stopped), "
                              "prune"),
                             ("fake-weex", cmd_fake_weex, "a local fake WEEX exchange on 127.0.0.1 for tests and "
                              "demos")):
        sp = sub.add_parser(name, help=text, add_help=False)  # the command's own parser handles its options
        sp.set_defaults(func=func, delegated=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if getattr(args, "delegated", False):
        args.rest = rest
    elif rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    # the config dir given on the command line wins over the environment for everything that reads it
    if args.config_dir:
        os.environ["ALPHAPULSE_CONFIG_DIR"] = args.config_dir
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
