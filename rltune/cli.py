"""The `rltune` command: compose the config with Hydra, check it, run the trainer.

    rltune [group=option ...] [key=value ...]        one run, in Hydra's run directory
    rltune -m key=a,b ...                            a sweep, one run directory per job
    rltune +recipe=<name>                            a ready preset from recipes/

Everything that can be checked without loading a model is checked first, for every job of a
sweep: unknown keys (including ones added with `+`), unknown group options and values of the
wrong type (Hydra's errors), and values outside their allowed set. Those exit with status 2 and
a message naming the key; so does bad data, found when a run reads it (in a sweep, after the
other jobs have run). A crash exits 1.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import logging
import os
import sys
import traceback
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
_failed_jobs: list[str] = []
"""A sweep's jobs that stopped on bad input, reported once every job has run."""


def _task(cfg: DictConfig) -> None:
    global _last_run_dir
    from hydra.types import RunMode

    from rltune.data import DataError
    from rltune.trainer import Interrupted, train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    _last_run_dir = run_dir
    try:
        settings = check_schema(cfg)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # wandb tells the jobs apart by what they vary
            lg = settings.logger
            lg.run_name = lg.run_name or hydra_cfg.job.override_dirname or str(hydra_cfg.job.num)
            lg.group = lg.group or Path(hydra_cfg.sweep.dir).name
        train(
            settings,
            run_dir,
            config_yaml=OmegaConf.to_yaml(cfg),
            config_dict=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        )
    except (ConfigError, DataError) as err:
        _to_log_file(f"rltune: error: {err}")
        print(f"rltune: error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep's other jobs still run
            _failed_jobs.append(f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})")
            return
        sys.exit(CONFIG_ERROR_EXIT)
    except Interrupted as stop:
        log.warning("%s; continue with train.resume=auto", stop)
        sys.exit(128 + stop.signum)
    except Exception:
        _to_log_file(f"the run failed:\n{traceback.format_exc()}")
        raise


def _to_log_file(message: str) -> None:
    """`message` in the run's cli.log only: the console gets the error once, from the caller
    (or Hydra's own report of a crash), not a second time through logging."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


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


def job_overrides(args: list[str]) -> list[str]:
    """The config overrides among `args`: not flags, not Hydra's own settings."""
    return [a for a in args if not a.startswith(("-", "hydra.", "+hydra.", "~hydra."))]


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The overrides of each job of a multirun (`-m key=a,b`), as Hydra's basic sweeper
    expands them; [] when `args` is not a multirun or uses sweeps that sweeper cannot expand."""
    if not {"-m", "--multirun"} & set(args):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = job_overrides(args)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException:  # a range or interval sweep (another sweeper's): Hydra reports it
        return []
    return [job for batch in batches for job in batch]


HYDRA_FLAGS = (
    "--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--version", "--resolve",
    "--package", "-p", "--shell-completion", "-sc", "--config-name", "-cn", "--config-path",
    "-cp", "--config-dir", "-cd", "--experimental-rerun",
)  # fmt: skip
"""Hydra's own flags: with any of them, Hydra alone reads the command line."""
HYDRA_COMPOSITION = ("hydra.searchpath", "hydra.mode", "hydra.sweeper", "hydra/sweeper")
"""Overrides that change how Hydra composes or launches (a search path, multirun mode), and
`${hydra:...}` values, which need Hydra's runtime: with any of them the pre-check is left to
Hydra's own run."""


def check_jobs(args: list[str]) -> None:
    """Every job's config composed and checked before the first starts: one for a run, each
    job of a multirun (a bad value in the last job would otherwise fail only after the others
    had trained). ConfigError names the key, and the job in a sweep. Hydra's own errors (an
    unknown group option, a value of the wrong type, a malformed override) become
    ConfigErrors too, so every bad command exits with the same status."""
    if any(a.split("=")[0] in HYDRA_FLAGS for a in args) or any(
        a.lstrip("+~").startswith(HYDRA_COMPOSITION) or "${hydra:" in a for a in args
    ):
        return
    sweep = bool({"-m", "--multirun"} & set(args))
    jobs = sweep_jobs(args) if sweep else [job_overrides(args)]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    for i, job in enumerate(jobs):
        where = f"sweep job {i} ({' '.join(job)}): " if sweep else ""
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
                check_schema(compose(config_name="config", overrides=job))
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(f"{where}{_hydra_message(err)}") from None
        finally:
            GlobalHydra.instance().clear()


def _hydra_message(err: Exception) -> str:
    """Hydra's composition error in a line or two: the option lists without the schema
    nodes (base_*) and the search path, a failed conversion with its reason."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        # the group is the path's first folder where that is one of rltune's, so that an
        # option with a slash in it (data=dir/file.jsonl in a sweep of presets) is named whole
        top, _, rest = err.missing_cfg_file.partition("/")
        if (conf_dir() / top).is_dir():
            group, name = top, rest
        else:
            group, _, name = err.missing_cfg_file.rpartition("/")
        options = [o for o in err.options if not o.startswith("base_")]
        hint = " (or a data file, folder or org/name hub id)" if group == "data" else ""
        return f"{group}={name}: no such option; one of: {', '.join(options)}{hint}"
    text = str(err).strip()
    if err.__cause__ is not None:
        text += f": {str(err.__cause__).strip().splitlines()[0]}"
    return text


def launcher_args_removed(args: list[str]) -> list[str]:
    """`args` without the `--local_rank=N` that the `deepspeed` launcher appends (Hydra would
    refuse it; the launcher sets LOCAL_RANK in the environment too, which is what is read)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True  # its value follows
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def data_shorthand(args: list[str]) -> list[str]:
    """`args` with `data=<file, folder or hub id>` (or `+data=`) read as `data=custom
    data.path=<it>`, as `rltune algo=dpo data=my_prefs.jsonl` is meant, also for a list of them
    (`data=[a.jsonl,b.jsonl]`: data.path's list, each loaded) and where every value of a sweep
    is one (`-m data=a.jsonl,b.jsonl`: a sweep over data.path); a data preset's name
    (`data=arith`), a list of presets (Hydra merges them in order) and a sweep over presets stay
    as they are. A list that mixes presets and data is a ConfigError: neither reading fits it.
    The value is read as Hydra reads it (quotes, sweeps) and passed on as it was written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    from rltune.data.loading import SUPPORTED_SUFFIXES, is_hub_id

    presets = {p.stem for p in (conf_dir() / "data").glob("*.yaml")}

    def is_data(value: object) -> bool:
        if isinstance(value, list):  # data=[a.jsonl,org/b]: every element, none a list itself
            return bool(value) and all(not isinstance(v, list) and is_data(v) for v in value)
        if not isinstance(value, str) or value in presets:
            return False
        path = Path(value).expanduser()
        hub = "/" in value and is_hub_id(value)  # org/name: a bare word is a preset's typo
        return path.exists() or path.suffix.lower() in SUPPORTED_SUFFIXES or hub

    parser = OverridesParser.create()
    out = []
    for a in args:
        key, eq, text = a.partition("=")
        if key in ("data", "+data") and eq:  # `+`: the group is in the defaults already
            try:
                value = parser.parse_override(a).value()
            except HydraException:  # malformed: Hydra's own run says how
                value = None
            values = value.list if isinstance(value, ChoiceSweep) else [value]
            for v in values:  # data=[arith,a.jsonl]: neither data.path's list nor presets
                found = [x for x in v if is_data(x)] if isinstance(v, list) else []
                if found and len(found) < len(v):
                    raise ConfigError(mixed_data_list_error(v, found))
            if values and all(is_data(v) for v in values):
                out += ["data=custom", f"data.path={text}"]
                continue
        out.append(a)
    return out


def dict_overrides(args: list[str]) -> list[str]:
    """`args` with overrides of a dict setting (`data.columns={question: prompt}`,
    `data.columns.question=prompt`, `model.lrs={grpo: 1e-5}`) given Hydra's `++`: the config is
    in struct mode, so Hydra refuses a key the dict does not have yet (an empty dict has none)
    unless the override adds. The keys are merged into the dict, as with any Hydra override
    of a dict; a key of its own may still be given `+` or `++`."""
    from typing import get_origin, get_type_hints

    dicts = {
        f"{section}.{name}"
        for section, cls in get_type_hints(RLTuneConfig).items()
        if dataclasses.is_dataclass(cls)
        for name, hint in get_type_hints(cls).items()
        if get_origin(hint) is dict
    }
    out = []
    for a in args:
        key, eq, _ = a.partition("=")
        if eq and any(key == d or key.startswith(f"{d}.") for d in dicts):
            a = f"++{a}"
        out.append(a)
    return out


def mixed_data_list_error(values: list[object], data: list[object]) -> str:
    """Why `data=[<values>]`, where only `data` are files, folders or hub ids, is refused."""
    listed = ",".join(map(str, data))
    others = ", ".join(str(v) for v in values if v not in data)
    return (
        f"data=[{','.join(map(str, values))}] mixes data ({', '.join(map(str, data))}) with "
        f"values that are no file, folder or hub id ({others}): a list of data is read as "
        f"data.path, a list of presets is merged by Hydra; use data=[{listed}] for the data "
        f"alone, or data=<preset> data.path=[{listed}]"
    )


def main() -> None:
    """Console entry point (`rltune ...`, `python -m rltune ...`)."""
    args = launcher_args_removed(sys.argv[1:])
    if args == ["--version"]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"rltune {version('rltune')}")
        except PackageNotFoundError:  # sources on the path, not installed
            print("rltune (not installed)")
        return
    try:
        args = dict_overrides(data_shorthand(args))
        check_override_keys(args)
        check_jobs(args)
    except ConfigError as err:
        print(f"rltune: error: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    sys.argv = [sys.argv[0], *args]
    register_configs()
    _failed_jobs.clear()
    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)(_task)
    app()
    if _failed_jobs:
        print(f"rltune: error: stopped on bad input: {', '.join(_failed_jobs)}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)


def console() -> None:
    """The `rltune` command and `python -m rltune`: `main`, then, in a process of a
    multi-process launch, the end without the interpreter's teardown (`run`, for code that
    calls rltune and goes on, does not end its process)."""
    main()
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
