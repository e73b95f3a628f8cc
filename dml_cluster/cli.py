"""The `dml-cluster` command line: thin wrappers over config, launch and report."""

from __future__ import annotations

import sys

import click
import yaml

from dml_cluster.console import write_whole_lines
from dml_cluster.errors import ConfigError, DmlError, ReportedElsewhere
from dml_cluster.signals import (
    Interrupted,
    reports_signals,
    signal_name,
    stop_on_signals,
    stopping,
)

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
    "--nproc", type=int, default=None, metavar="K",
    help="Run one process per peer (K = the cohort size; K x D with cohort.replicas D) "
    "through torch's elastic launcher; "
    "the default for the zmq and torch transports, and it makes 'local' zmq.",
)  # fmt: skip
@click.option("--max-restarts", type=int, default=0, help="Restarts of the peer group (--nproc).")
@click.option(
    "--init-from", "init_from", default=None, metavar="RUN",
    help="Start every student from the final weights of the run in folder RUN (its peer of the "
    "same name), with a fresh optimizer and schedule (= --set train.init_from=RUN).",
)  # fmt: skip
def train(
    config: str,
    overrides: tuple[str, ...],
    nproc: int | None,
    max_restarts: int,
    init_from: str | None,
) -> None:
    """Train the cohort described by CONFIG (a YAML file).

    Started again in a run folder it resumes from the newest complete checkpoint; a finished
    run says so in one line and changes nothing."""
    import json

    from dml_cluster.checkpoint.standing import examine, finished_line
    from dml_cluster.config import load_config
    from dml_cluster.init_from import source_summary
    from dml_cluster.launch import (
        adopt_torch_runtime_env,
        launch_elastic,
        reported_once,
        run_local,
        run_peer,
        under_launcher,
    )
    from dml_cluster.metrics.loggers import check_loggers
    from dml_cluster.preemption import launcher_wait_s

    if max_restarts < 0:  # whichever way the cohort runs
        raise ConfigError(f"--max-restarts {max_restarts}: must be 0 or more")
    adopt_torch_runtime_env()  # a Kubeflow Trainer v2 node: PET_* as RANK, WORLD_SIZE, ...
    if init_from is not None:  # a string whatever it looks like (YAML would read 12 as a number)
        overrides = (*overrides, f"train.init_from={json.dumps(init_from)}")
    if under_launcher():  # one peer of a cohort; its launcher's --nproc is not ours to check
        stop_on_signals()
        with reported_once():
            cfg = load_config(config, list(overrides))
        run_peer(cfg)
        return
    cfg = load_config(config, list(overrides))
    replicas = cfg.cohort.replicas
    size = len(cfg.peers) * replicas
    if nproc is None and cfg.bus.transport == "local":
        if replicas > 1:
            raise ConfigError(
                f"config error: cohort.replicas: {replicas} runs each peer as {replicas} "
                f"processes: --nproc {size} (with bus.transport zmq or torch)"
            )
        stop_on_signals()
        run_local(cfg)
        return
    _check_nproc(nproc, size, max_restarts, replicas)
    check_loggers(cfg)  # before the launcher starts anything
    source_summary(cfg)  # --init-from: a finished run with these peers
    names = [p.name for p in cfg.peers]
    finished = finished_line(cfg, examine(cfg, cfg.run.dir), names, reporter=True)
    if finished:  # a complete run started again: no peer process to start, nothing written
        click.echo(finished)
        return
    if cfg.bus.transport == "local":  # --nproc asks for a process per peer: that takes a bus
        overrides = (*overrides, "bus.transport=zmq")
        load_config(config, list(overrides))  # the zmq settings are valid too
        click.echo(
            f"dml-cluster: --nproc {size} runs one process per peer, so bus.transport 'local' "
            "becomes zmq (choose with --set bus.transport=zmq|torch)",
            err=True,
        )
    wait_s = launcher_wait_s(cfg)
    sys.exit(launch_elastic(config, list(overrides), size, max_restarts, wait_s, cfg.run.dir))


def _check_nproc(nproc: int | None, size: int, max_restarts: int, replicas: int = 1) -> None:
    """`--nproc K` starts one process per peer: K must be the cohort size, K x D with
    cohort.replicas D (`size`: the processes the cohort takes; checked before torch's launcher
    starts anything)."""
    if nproc is not None and nproc < 1:
        raise ConfigError(
            f"--nproc {nproc}: at least one process is needed, one per peer "
            f"(this cohort has {size}: --nproc {size})"
        )
    if nproc is not None and nproc != size and replicas > 1:
        raise ConfigError(
            f"--nproc {nproc}, but the cohort has {size // replicas} peers x {replicas} replicas "
            f"(cohort.replicas) and runs one process per replica: --nproc {size} (or torchrun "
            f"--nproc-per-node {size})"
        )
    if nproc is not None and nproc != size:
        raise ConfigError(
            f"--nproc {nproc}, but the cohort has {size} peers and runs one process per peer: "
            f"--nproc {size} (or change cohort.size)"
        )


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the report (default: RUN_DIR/report).")  # fmt: skip
def report(run_dir: str, out_dir: str | None) -> None:
    """Plots and a Markdown summary of the run in RUN_DIR (from its JSONL logs)."""
    from dml_cluster.report import load_run, write_report

    logs = load_run(run_dir)
    files = write_report(run_dir, out_dir, logs)
    click.echo(f"report: {files[0]}")
    for path in files[1:]:
        click.echo(f"  {path}")
    for warning in logs.warnings:  # e.g. a peer that looks trained and is not
        click.echo(warning["message"])


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_SET
@click.option(
    "--nproc",
    is_flag=True,
    help="Train each round's cohort one process per peer (torch's elastic launcher).",
)
@click.option(
    "--retrain",
    "retrain_best",
    is_flag=True,
    help="Then train the best architecture fully with KD; report its test accuracy.",
)
@click.option(
    "--compare",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Another search's run folder to overlay on the Pareto plot (repeatable).",
)
def search(
    config: str,
    overrides: tuple[str, ...],
    nproc: bool,
    retrain_best: bool,
    compare: tuple[str, ...],
) -> None:
    """Search the student architecture that distils best from a teacher (AKD), per CONFIG."""
    from pathlib import Path

    from dml_cluster.search.settings import load_search_config

    scfg = load_search_config(config, list(overrides))  # checked in full before anything runs
    from dml_cluster.search.run import run_search

    stop_on_signals()
    options = dict(nproc=nproc, retrain_best=retrain_best, compare=[Path(c) for c in compare])
    run_search(scfg, say=click.echo, **options)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="The config the runs were trained with (default: RUN_DIR/config.yaml).",
)  # fmt: skip
@_SET
@click.option("--sigma", "sigmas", default="0.01,0.02,0.04,0.08", show_default=True,
              help="Comma-separated std values of the weight noise.")  # fmt: skip
@click.option("--draws", type=click.IntRange(min=1), default=5, show_default=True,
              help="Noise draws averaged per sigma.")  # fmt: skip
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="The figure comparing the runs (default: FIRST_RUN_DIR/analysis.png).",
)  # fmt: skip
def analyze(
    run_dirs: tuple[str, ...], config_path: str | None, overrides: tuple[str, ...],
    sigmas: str, draws: int, plot: str | None,
) -> None:  # fmt: skip
    """The DML paper's analysis of trained runs: training-set posterior entropy per student and
    flatness (training-loss rise under Gaussian weight noise); one figure for all RUN_DIRS."""
    from pathlib import Path

    from dml_cluster.analyze import analyze_run, flag_lines, flatness_plot, summary_table

    try:
        values = [float(v) for v in sigmas.split(",")]
    except ValueError:
        raise ConfigError(f"--sigma {sigmas!r}: expected comma-separated numbers") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"--sigma {sigmas!r}: every sigma must be > 0")
    results = [analyze_run(Path(d), values, draws, config_path, list(overrides)) for d in run_dirs]
    click.echo(summary_table(results))
    for line in flag_lines(results):  # ⚠ in the table; left out of the figure
        click.echo(line)
    groups = {Path(r["run"]).name: list(r["peers"].values()) for r in results}
    figure = flatness_plot(groups, values, Path(plot or Path(run_dirs[0]) / "analysis.png"))
    click.echo(f"analysis: {', '.join(str(Path(d) / 'analysis.json') for d in run_dirs)}")
    click.echo(f"figure: {figure}")


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


@cli.group()
def k8s() -> None:
    """Kubernetes manifests for a cohort (see k8s/README.md)."""


@k8s.command("render")
@click.argument("config", type=click.Path(dir_okay=False))
@_SET
@click.option("--image", required=True, help="The container image (built from the Dockerfile).")
@click.option("--engine", type=click.Choice(["trainjob", "jobset", "indexed-job", "pytorchjob"]),
              default="trainjob", show_default=True,
              help="trainjob: Kubeflow Trainer v2 TrainJob + its TrainingRuntime; jobset: the "
              "JobSet the Trainer would make (JobSet without the Trainer); indexed-job: Indexed "
              "Job + Service (plain Kubernetes); pytorchjob: DEPRECATED, Kubeflow Training "
              "Operator v1.")  # fmt: skip
@click.option("--runtime", default=None,
              help="trainjob: the name of the TrainingRuntime rendered beside the TrainJob "
              "(default: the job's name).")  # fmt: skip
@click.option("--queue", default=None, metavar="LOCALQUEUE",
              help="Kueue: queue the workload in this LocalQueue (label "
              "kueue.x-k8s.io/queue-name); it is rendered suspended and Kueue starts "
              "it.")  # fmt: skip
@click.option("--priority-class", default=None, metavar="NAME",
              help="Kueue: the WorkloadPriorityClass (label "
              "kueue.x-k8s.io/priority-class).")  # fmt: skip
@click.option("--data-pvc", default=None, metavar="CLAIM[:MOUNT]",
              help="A PersistentVolumeClaim holding the data, mounted read-only at MOUNT "
              "(/data); the config's relative data paths are rewritten under it.")  # fmt: skip
@click.option("--data-host-path", default=None, metavar="PATH[:MOUNT]",
              help="A node folder holding the data (single-node clusters), mounted read-only "
              "at MOUNT (/data).")  # fmt: skip
@click.option("--data-in-image", default=None, metavar="DIR",
              help="The data is baked into the image under DIR: relative paths are rewritten "
              "under it, absolute ones are the image's.")  # fmt: skip
@click.option("--namespace", default="default", show_default=True)
@click.option("--name", default=None, help="Job name (default: from run.name).")
@click.option("--gpus-per-peer", type=int, default=1, show_default=True,
              help="nvidia.com/gpu per peer pod (0: CPU only).")  # fmt: skip
@click.option("--cpu", default=None, help="CPU request per peer (default: run.threads).")
@click.option("--memory", default="4Gi", show_default=True, help="Memory per peer.")
@click.option("--pvc", default=None,
              help="PersistentVolumeClaim (ReadWriteMany) for run folders and checkpoints; "
              "default: an emptyDir that goes with the pod.")  # fmt: skip
@click.option("--monitor", type=click.Choice(["pod", "service", "none"]), default="pod",
              show_default=True, help="PodMonitor, ServiceMonitor, or none.")  # fmt: skip
@click.option("--monitor-label", multiple=True, metavar="KEY=VALUE",
              help="Label for Prometheus to select, e.g. release=prometheus.")  # fmt: skip
@click.option("--label", multiple=True, metavar="KEY=VALUE",
              help="Label on every resource, e.g. kueue.x-k8s.io/queue-name=q.")  # fmt: skip
@click.option("--dashboard", type=click.Path(dir_okay=False), default=None,
              help="A Grafana dashboard JSON to ship as a sidecar-loaded ConfigMap.")  # fmt: skip
@click.option("--backoff-limit", type=int, default=3, show_default=True,
              help="Retries of the cohort (TrainJob, JobSet, Indexed Job: pod retries, times "
              "the cohort size).")  # fmt: skip
@click.option("--max-restarts", type=int, default=3, show_default=True,
              help="Indexed Job: torchrun restarts of the peer group inside the pods; TrainJob, "
              "JobSet: restarts of the whole cohort (failurePolicy.maxRestarts).")  # fmt: skip
@click.option("--master-port", type=int, default=23456, show_default=True)
@click.option("--rdzv-port", type=int, default=29400, show_default=True)
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option("--curve/--no-curve", default=True, show_default=True,
              help="Encrypt the zmq bus of a multi-peer cohort with CURVE keys from a Secret "
              "(see --curve-secret); --no-curve: an open bus (the NetworkPolicy still "
              "applies).")  # fmt: skip
@click.option("--curve-secret", default=None,
              help="The Secret with the cohort's CURVE keys (default: <job>-curve; make it with "
              "`dml-cluster keys generate DIR --k8s-secret NAME`).")  # fmt: skip
@click.option("--prometheus-namespace", default="monitoring", show_default=True,
              help="The namespace whose Prometheus may scrape the peers "
              "(NetworkPolicy).")  # fmt: skip
@click.option("--prometheus-label", multiple=True, metavar="KEY=VALUE",
              help="Labels of the Prometheus pods the NetworkPolicy admits "
              "(default: app.kubernetes.io/name=prometheus).")  # fmt: skip
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write one file per resource and a kustomization.yaml here (default: one "
              "YAML stream on stdout).")  # fmt: skip
def k8s_render(config: str, overrides: tuple[str, ...], out_dir: str | None, **options) -> None:
    """Render the manifests that run CONFIG on Kubernetes, one pod per peer."""
    from dml_cluster.k8s import RenderOptions, parse_labels, pod_config, render, stream, write
    from dml_cluster.k8s.options import split_mount
    from dml_cluster.k8s.security import mounted_secrets

    options["labels"] = parse_labels(options.pop("label"), "--label")
    options["monitor_labels"] = parse_labels(options.pop("monitor_label"), "--monitor-label")
    prometheus = parse_labels(options.pop("prometheus_label"), "--prometheus-label")
    if prometheus:
        options["prometheus_labels"] = prometheus
    data_options = (("data_pvc", "data_pvc_mount", "--data-pvc"),
                    ("data_host_path", "data_host_mount", "--data-host-path"))  # fmt: skip
    for key, mount, what in data_options:
        if options[key] is not None:
            options[key], options[mount] = split_mount(options[key], what)
    cfg, raw = pod_config(config, list(overrides))
    files = render(cfg, raw, RenderOptions(**options))
    for secret in mounted_secrets(files):
        click.echo(
            f"dml-cluster: note: the pods mount Secret {secret} (the bus's CURVE keys); make it "
            f"with `dml-cluster keys generate DIR --k8s-secret {secret} --namespace "
            f"{options['namespace']}` and `kubectl apply -f DIR/{secret}.yaml`, or render with "
            "--no-curve",
            err=True,
        )
    if out_dir is None:
        click.echo(stream(files), nl=False)
        return
    for path in write(files, out_dir):
        click.echo(f"wrote {path}")


@cli.group()
def keys() -> None:
    """CURVE keys that encrypt the zmq bus and admit only the cohort (bus.curve_keys)."""


@keys.command("generate")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--name", default="cohort", show_default=True,
              help="Key pair name: 'cohort' (shared by every peer) or a peer's name.")  # fmt: skip
@click.option("--k8s-secret", "secret", default=None, metavar="SECRET",
              help="Also write FOLDER/SECRET.yaml, a Kubernetes Secret of the folder's keys for "
              "`k8s render --curve-secret SECRET` (default SECRET: <job>-curve).")  # fmt: skip
@click.option("--namespace", default="default", show_default=True,
              help="The Secret's namespace (the job's).")  # fmt: skip
def keys_generate(folder: str, name: str, secret: str | None, namespace: str) -> None:
    """Write a key pair NAME.key / NAME.key_secret into FOLDER (e.g. for a Kubernetes Secret)."""
    from dml_cluster.bus.curve import generate_keys
    from dml_cluster.k8s.security import write_curve_secret

    public, private = generate_keys(folder, name)
    click.echo(f"public key: {public}\nsecret key: {private} (keep it secret)")
    if secret is not None:
        path = write_curve_secret(folder, secret, namespace)
        click.echo(f"kubernetes secret: {path} (kubectl apply -f {path}; keep it secret)")
    click.echo(f"use it with: --set bus.curve_keys={folder}")


@cli.group()
def tokenizer() -> None:
    """Tokenizers of text data (data.name: text)."""


@tokenizer.command("train")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--vocab", type=click.IntRange(min=1), required=True,
              help="Vocabulary size, the 256 byte symbols and end-of-text included.")  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False), default="tokenizer.json",
              show_default=True,
              help="Where to write the tokenizer (for data.tokenizer: PATH).")  # fmt: skip
def tokenizer_train(files: tuple[str, ...], vocab: int, out: str) -> None:
    """Train a byte-level BPE tokenizer on the UTF-8 text FILES (locally; needs the [lm] extra)."""
    from dml_cluster.data.tokenizers import train_bpe

    path = train_bpe(files, vocab, out)
    click.echo(f"tokenizer: {path} ({vocab} ids; use it with --set data.tokenizer={path})")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--peer", required=True, help="The peer (its name) whose final weights write.")
@click.option("--prompt", default="", help="The text to continue (default: a new document).")
@click.option("--tokens", type=click.IntRange(min=1), default=100, show_default=True,
              help="New tokens to sample at most (fewer if end-of-text comes).")  # fmt: skip
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Softmax temperature; 0: the most probable token (greedy).")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
def generate(
    run_dir: str, peer: str, prompt: str, tokens: int, temperature: float, seed: int
) -> None:
    """Print text sampled from a trained language-model peer of RUN_DIR."""
    from dml_cluster.generate import generate_from_run

    click.echo(generate_from_run(run_dir, peer, prompt, tokens, temperature, seed))


# click >= 8.2 raises it for a group given no command (it shows the group's help)
_HELP_FOR_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main() -> None:
    """Entry point: user errors are one line on stderr and an exit status, never a traceback."""
    write_whole_lines()  # peer processes share a terminal or log: no line split by another's
    try:
        cli.main(standalone_mode=False)
    except ReportedElsewhere as err:
        sys.exit(err.exit_code)
    except Interrupted as stop:  # a peer process (see dml_cluster/signals.py)
        if reports_signals():
            click.echo(f"dml-cluster: stopped by {stop}", err=True)
        sys.exit(stop.exit_code)
    except DmlError as err:
        _exit_if_stopping()  # a peer lost because a stop signal ended it: the stop says it
        click.echo(f"dml-cluster: {err}", err=True)
        sys.exit(err.exit_code)
    except _HELP_FOR_NO_ARGS as err:  # `dml-cluster keys` alone: that group's help
        err.show()
        sys.exit(err.exit_code)
    except click.UsageError as err:  # a bad option or argument: one line, as every error
        where = err.ctx.command_path if err.ctx is not None else "dml-cluster"
        click.echo(f"dml-cluster: {_one_line(err.format_message())} (see {where} --help)", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        click.echo(f"dml-cluster: {_one_line(err.format_message())}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("dml-cluster: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("dml-cluster: interrupted", err=True)
        sys.exit(130)
    except Exception:
        _exit_if_stopping()
        raise


def _exit_if_stopping() -> None:
    """After a stop signal, an error on the way out is its consequence (a peer it stopped first,
    a loader worker it ended): the stop is the story, told in its one line, with its status."""
    signum = stopping()
    if signum is None:
        return
    if reports_signals():
        click.echo(f"dml-cluster: stopped by {signal_name(signum)}", err=True)
    sys.exit(128 + signum)
