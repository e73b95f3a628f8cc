"""The `dml-cluster` command line: thin wrappers over config, launch and report."""

from __future__ import annotations

import sys

import click
import yaml

from dml_cluster.errors import DmlError

_SET = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config value, e.g. --set optim.lr=0.05 (repeatable).",
)  # fmt: skip


@click.group()
def cli() -> None:
    """Train cohorts of networks that learn from each other (Deep Mutual Learning)."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_SET
@click.option(
    "--nproc", type=int, default=None,
    help="Run one process per peer through torch's elastic launcher (default for zmq/torch "
    "transports: one per peer).",
)  # fmt: skip
@click.option("--max-restarts", type=int, default=0, help="Restarts of the peer group (--nproc).")
def train(config: str, overrides: tuple[str, ...], nproc: int | None, max_restarts: int) -> None:
    """Train the cohort described by CONFIG (a YAML file)."""
    from dml_cluster.config import load_config
    from dml_cluster.launch import launch_elastic, run_local, run_peer, under_launcher

    cfg = load_config(config, list(overrides))
    if under_launcher():
        run_peer(cfg)
    elif nproc is None and cfg.bus.transport == "local":
        run_local(cfg)
    else:
        if cfg.bus.transport == "local":
            raise DmlError("--nproc needs bus.transport zmq or torch (add --set bus.transport=zmq)")
        sys.exit(launch_elastic(config, list(overrides), nproc or len(cfg.peers), max_restarts))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the report (default: RUN_DIR/report).")  # fmt: skip
def report(run_dir: str, out_dir: str | None) -> None:
    """Plots and a Markdown summary of the run in RUN_DIR (from its JSONL logs)."""
    from dml_cluster.report import write_report

    files = write_report(run_dir, out_dir)
    click.echo(f"report: {files[0]}")
    for path in files[1:]:
        click.echo(f"  {path}")


@cli.group()
def config() -> None:
    """Inspect experiment configs."""


@config.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@_SET
def config_show(path: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    from dml_cluster.config import load_config

    cfg = load_config(path, list(overrides))
    click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    click.echo(f"# config hash: {cfg.hash()}")


def main() -> None:
    """Entry point: user errors are one line on stderr and an exit status, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except DmlError as err:
        click.echo(f"dml-cluster: {err}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("dml-cluster: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("dml-cluster: interrupted", err=True)
        sys.exit(130)
