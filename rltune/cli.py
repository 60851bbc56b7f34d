"""The `rltune` command: compose the config with Hydra, check it, run the trainer.

    rltune [group=option ...] [key=value ...]        one run, in Hydra's run directory
    rltune -m key=a,b ...                            a sweep, one run directory per job
    rltune +recipe=<name>                            a ready preset from recipes/

Everything that can be checked without loading a model is checked first: unknown keys
(including ones added with `+`), unknown group options (Hydra), and values outside their
allowed set. Those exit with status 2 and a message naming the key.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from rltune.config import ConfigError, RLTuneConfig, register_configs, validate

log = logging.getLogger("rltune")

CONFIG_ERROR_EXIT = 2


def conf_dir() -> Path:
    """conf/ beside the package in a source checkout, or inside it when installed as a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"rltune's conf/ folder is missing (looked beside {here})")


def unknown_keys(node: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys present in the composed config but absent from the dataclass schema of their node.
    Hydra lets `+key=value` through the schema; this catches it."""
    found = []
    schema = OmegaConf.get_type(node)
    allowed = (
        [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    )
    for key in node:
        full = f"{prefix}{key}"
        if allowed is not None and key not in allowed:
            found.append((full, allowed))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found.extend(unknown_keys(child, f"{full}."))
    return found


def unknown_key_error(key: str, allowed: list[str]) -> ConfigError:
    """The error for an unknown (dotted) `key`, with the closest of the `allowed` names."""
    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"Unknown config key '{key}'.{hint} Valid keys here: {', '.join(allowed)}")


def check_schema(cfg: DictConfig) -> RLTuneConfig:
    """The composed config as typed dataclasses, or a ConfigError naming the first bad key."""
    bad = unknown_keys(cfg)
    if bad:
        raise unknown_key_error(*bad[0])
    try:
        settings = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} must be set (e.g. {err.full_key}=...)") from None
    assert isinstance(settings, RLTuneConfig)
    validate(settings)
    return settings


_last_run_dir: Path | None = None


def _task(cfg: DictConfig) -> None:
    global _last_run_dir
    from rltune.data import DataError
    from rltune.trainer import Interrupted, train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    _last_run_dir = run_dir
    try:
        settings = check_schema(cfg)
        train(
            settings,
            run_dir,
            config_yaml=OmegaConf.to_yaml(cfg),
            config_dict=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        )
    except (ConfigError, DataError) as err:
        log.error("%s", err)
        print(f"rltune: error: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    except Interrupted as stop:
        log.warning("%s; continue with train.resume=auto", stop)
        sys.exit(128 + stop.signum)


def check_override_keys(args: list[str]) -> None:
    """Unknown keys in `section.key=value` overrides, found before Hydra composes (Hydra would
    fail with its own message and status 1): ConfigError naming the key and the closest
    valid one. `algo.*` keys are checked against every algorithm's settings, since recipes may
    choose the algorithm."""
    from rltune import config

    # section -> its dataclass (the fields' annotations are the classes' names)
    sections = {
        f.name: getattr(config, str(f.type), None) for f in dataclasses.fields(RLTuneConfig)
    }
    for arg in args:
        key, eq, _ = arg.partition("=")
        if not eq or key.startswith(("-", "+", "~", "hydra")) or "." not in key:
            continue
        section, _, rest = key.partition(".")
        name = rest.split(".")[0]
        if section == "algo":
            algos = config.ALGO_CONFIGS.values()
            allowed = sorted({f.name for c in algos for f in dataclasses.fields(c)})
        elif dataclasses.is_dataclass(sections.get(section)):
            allowed = [f.name for f in dataclasses.fields(sections[section])]
        else:
            continue
        if name not in allowed:
            raise unknown_key_error(f"{section}.{name}", allowed)


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The overrides of each job of a multirun (`-m key=a,b`), as Hydra's basic sweeper
    expands them; [] when `args` is not a multirun or uses sweeps that sweeper cannot expand."""
    if not {"-m", "--multirun"} & set(args):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = [a for a in args if not a.startswith(("-", "hydra.", "+hydra.", "~hydra."))]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException:  # a range or interval sweep (another sweeper's): Hydra reports it
        return []
    return [job for batch in batches for job in batch]


def check_sweep(args: list[str]) -> None:
    """Every job of a multirun composed and checked before the first starts: a bad value in
    the last job would otherwise fail only after the others had trained. ConfigError names
    the job."""
    jobs = sweep_jobs(args)
    if len(jobs) < 2:
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    for i, job in enumerate(jobs):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
                check_schema(compose(config_name="config", overrides=job))
        except ConfigError as err:
            raise ConfigError(f"sweep job {i} ({' '.join(job)}): {err}") from None
        except Exception:  # noqa: BLE001 - composition errors: Hydra reports them itself
            break
        finally:
            GlobalHydra.instance().clear()


def main() -> None:
    """Console entry point (`rltune ...`, `python -m rltune ...`)."""
    try:
        check_override_keys(sys.argv[1:])
        check_sweep(sys.argv[1:])
    except ConfigError as err:
        print(f"rltune: error: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    register_configs()
    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)(_task)
    app()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_launched_process()


def _exit_launched_process() -> None:
    """End a process of a multi-process launch whose runs all finished: the exit handlers run
    (process group torn down, wandb and logs closed), then the process ends without the
    interpreter's own teardown. That teardown can abort (`terminate called without an active
    exception`, rarely, from a native thread of the communication backends) after every file
    is written, turning a finished run into a failed launch."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(overrides: list[str]) -> Path:
    """Run rltune in this process as if `rltune *overrides` was typed; return the run directory."""
    saved = sys.argv
    sys.argv = ["rltune", *overrides]
    try:
        main()
    finally:
        sys.argv = saved
    assert _last_run_dir is not None
    return _last_run_dir
