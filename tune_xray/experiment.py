"""The experiment directory: one reader and writer of what a search leaves, for the search that writes it and for
the ensemble, the repeats, the report and predict that read it. Trial directory names are made here; the file,
status and key names it reads and writes are tune_xray.record.names', shared with the trial that writes its own.

    EXPERIMENT_DIR/                  (local; with a remote --storage, Tune's part is there, result files fetched here)
      search.json                    the invocation: what a --resume repeats
      summary.json                   trials by status, the best, the ensemble, the repeats, what failed after them
      .search.lock                   held while a search runs
      optuna.db, mlflow.db           the default Optuna and MLflow stores
      t007-<trial id>/               a trial's results: config.yaml, summary.json, best.pt, predictions_{val,test}.csv
      repeats/t007-s1000-<id>/       the same for a repeat (tune_xray.repeat)
      ensemble/                      ensemble.json, members.csv, model_card.md, predictions_test.csv, selection curve
      test_reads.json                every read of the test split's labels
      report.html, report.json       the study's page and the numbers it is drawn from
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from pydantic import BaseModel, ValidationError

from .cluster import download, upload
from .config import ConfigError, DataConfig
from .credentials import mask, reveal
from .metrics import resampling_units
from .record.models import EnsembleRecord, SearchSummary
from .record.names import (
    CV_DIR,
    CV_FOLD,
    CV_OF,
    ENSEMBLE_DIR,
    ENSEMBLE_FILE,
    INVOCATION_FILE,
    LOCK_FILE,
    PARENT_ID_FILE,
    REPEAT_OF,
    REPEAT_SEED,
    REPEATS_DIR,
    REPORT_FILE,
    RESULT_FILES,
    SQLITE_STORES,
    SUMMARY_FILE,
    TEST_READS,
    TRIAL_NUMBER,
)
from .request import SearchRequest, read_stored


def provenance() -> dict:
    """What ran: the package version, its git commit where it runs from a repository (`+dirty` with uncommitted
    changes), Python and torch."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    def git(*args) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    try:
        package = version("tune_xray")
    except PackageNotFoundError:  # the registered model's code, travelling without its metadata
        package = "unknown"
    import torch

    return {"tune_xray": package, "git_commit": commit or None, "python": platform.python_version(),
            "torch": torch.__version__}


class ExperimentError(ValueError):
    """An experiment directory, or a file in it, that is missing or cannot be read; the message names it."""


def checked(schema: type[BaseModel], value, path: Path):
    """`value` as the record's `schema` (record.models); the first field that does not fit is one ExperimentError
    naming the file and the field."""
    try:
        return schema.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ExperimentError(f"{path}: {where}: {first['msg']}") from None


def checked_summary(summary: dict, path: Path) -> SearchSummary:
    """`summary` as the typed record (checked)."""
    return checked(SearchSummary, summary, path)


def json_value(value):
    """What JSON cannot write itself (json.dumps' `default`): numpy arrays and scalars as JSON's own, anything else
    (a Path) as its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def trial_dir_name(trial: str, trial_id: str) -> str:
    """`t007-<trial id>`: the Optuna trial number first (Tune's trial name and directory)."""
    return f"{trial}-{trial_id}"


def trial_label(config: dict) -> str:
    """`t007`: a search trial by its Optuna trial number."""
    return f"t{config.get(TRIAL_NUMBER, -1):03d}"


def trial_name(trial) -> str:
    """Tune's trial name and directory for a search trial: `t007-<trial id>`, the Optuna trial number first."""
    return trial_dir_name(trial_label(trial.config), trial.trial_id)


def cv_name(trial) -> str:
    """Tune's trial name and directory for a fold trial (tune_xray.cv): `t007-f2-<trial id>`, fold 2 of trial
    t007's configuration."""
    return f"{trial.config[CV_OF]}-f{trial.config[CV_FOLD]}-{trial.trial_id}"


def repeat_name(trial) -> str:
    """Tune's trial name and directory for a repeat (tune_xray.repeat): `t007-s1000-<trial id>`, a repeat of
    trial t007 with seed 1000."""
    return f"{trial.config[REPEAT_OF]}-s{trial.config[REPEAT_SEED]}-{trial.trial_id}"


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"{path.parent}: no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExperimentError(f"{path}: not {what} ({type(err).__name__}: {err})") from None


def read_predictions(directory: Path, split: str, classes: list[str]) -> tuple:
    """A trial's stored predictions of a split: (paths, 0/1 targets, resampling units, probabilities); a file that
    is missing or lacks a column is an ExperimentError naming it."""
    path = Path(directory) / f"predictions_{split}.csv"
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ExperimentError(f"{path}: cannot read the trial's {split} predictions ({type(err).__name__})") from None
    missing = [c for c in [*(f"y_{c}" for c in classes), *(f"p_{c}" for c in classes), "path", "patient_id"]
               if c not in frame.columns]
    if missing:
        raise ExperimentError(f"{path}: missing column(s) {missing}")
    return (frame["path"].astype(str).tolist(), frame[[f"y_{c}" for c in classes]].to_numpy(),
            resampling_units(frame["patient_id"], frame["path"]),
            frame[[f"p_{c}" for c in classes]].to_numpy(dtype="float64"))


@dataclass(frozen=True)
class TrialTask:
    """What a trial's stored predictions are of and how it scored them: the task, its classes, its selection metric
    and its threshold rule (from the trial's summary.json and config.yaml)."""

    task: str
    classes: list[str]
    metric: str
    rule: str
    untrained: tuple[str, ...] = ()  # multi-label labels with no positive in train: never decided or averaged

    @classmethod
    def of(cls, directory: str | Path) -> TrialTask:
        directory = Path(directory)
        summary = read_json(directory / "summary.json", "a trial's summary")
        try:
            supervised = yaml.safe_load((directory / "config.yaml").read_text())["supervised"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
            raise ExperimentError(f"{directory / 'config.yaml'}: not a trial's config ({type(err).__name__})") from None
        return cls(summary["task"], list(summary["classes"]), supervised["selection_metric"], supervised["threshold"],
                   tuple(summary.get("untrained_labels") or ()))


def trial_data(directory: str | Path) -> DataConfig:
    """The data settings a trial ran with (its config.yaml's `data`): how a step after the search reads data as the
    trials did (the external record's label policies)."""
    path = Path(directory) / "config.yaml"
    try:
        return DataConfig.model_validate(yaml.safe_load(path.read_text())["data"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValidationError) as err:
        raise ExperimentError(f"{path}: not a trial's config ({type(err).__name__})") from None


def predicted_classes(directory: Path, split: str = "val") -> list[str]:
    """The classes a trial's stored predictions have a probability column for."""
    path = Path(directory) / f"predictions_{split}.csv"
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ExperimentError(f"{path}: cannot read the trial's {split} predictions ({type(err).__name__})") from None
    return [c[2:] for c in header if c.startswith("p_")]


@dataclass(frozen=True)
class Experiment:
    """A search's experiment: `directory` here, and `storage`/`name` where Tune keeps it (`path`: the same
    directory, or a URI for a remote --storage)."""

    directory: Path
    storage: str
    name: str

    @classmethod
    def locate(cls, name: str, storage: str, local_dir: str | Path = "tune_xray_runs") -> Experiment:
        """Where a search named `name` lives: under `storage` (a path or s3:// / gs://), its local files under
        `local_dir` when the storage is remote."""
        remote = "://" in storage
        storage = storage.rstrip("/") if remote else str(Path(storage).resolve())
        return cls((Path(local_dir).resolve() if remote else Path(storage)) / name, storage, name)

    @classmethod
    def at(cls, directory: str | Path) -> Experiment:
        """An existing experiment directory (a copied or renamed one too); its storage from its summary."""
        directory = Path(directory).resolve()
        if not directory.is_dir():
            raise ExperimentError(f"{directory}: no such experiment directory")
        stored = None
        if (directory / SUMMARY_FILE).is_file():
            with contextlib.suppress(ExperimentError):
                stored = read_json(directory / SUMMARY_FILE, "a search summary").get("storage")
        storage = stored.rsplit("/", 1)[0] if stored and "://" in stored else str(directory.parent)
        return cls(directory, storage, directory.name)

    @property
    def path(self) -> str:
        """Tune's experiment path (`Tuner.restore`, `ExperimentAnalysis`)."""
        return f"{self.storage}/{self.name}"

    @property
    def remote(self) -> bool:
        return "://" in self.storage

    # -- the search's own files ----------------------------------------------------------------------------------

    def stored_request(self) -> tuple[dict, dict]:
        """search.json's request: (the values the search's record depends on, its resources), in either of the
        file's formats (tune_xray.request); ({}, {}) when there is none."""
        path = self.directory / INVOCATION_FILE
        return read_stored(read_json(path, "a search's invocation")) if path.is_file() else ({}, {})

    def invocation(self) -> dict:
        """The values the search's record depends on (study, --set, --data, --smoke, ...; {} when none stored)."""
        return self.stored_request()[0]

    def request(self) -> SearchRequest | None:
        """The search's request as search.json stores it (None when there is none)."""
        kept, resources = self.stored_request()
        return SearchRequest.from_values({**kept, **resources}) if kept else None

    def write_request(self, request: SearchRequest) -> None:
        """search.json: what a --resume continues (passwords in URLs masked)."""
        self.write_text(INVOCATION_FILE, json.dumps(request.stored()))

    def summary(self) -> dict:
        """summary.json, checked against the record's schema (record.models.SearchSummary); missing, unreadable or
        malformed (a copy cut short, a hand edit) is an ExperimentError naming the file and the field."""
        return self._read_summary()[0]

    def record(self) -> SearchSummary:
        """summary.json as the typed record."""
        return self._read_summary()[1]

    def _read_summary(self) -> tuple[dict, SearchSummary]:
        path = self.directory / SUMMARY_FILE
        summary = read_json(path, "a search summary")
        if not isinstance(summary, dict) or "rows" not in summary:
            raise ExperimentError(f"{path}: not a search summary (no trial rows)")
        return summary, checked_summary(summary, path)

    def write_summary(self, summary: dict) -> None:
        """summary.json, passwords in URLs masked; what does not fit the record's schema is an error before
        anything is written."""
        self.write_json(SUMMARY_FILE, summary, SearchSummary)

    @property
    def optuna_url(self) -> str:
        return reveal(self.invocation().get("optuna_storage")) or f"sqlite:///{self.directory / 'optuna.db'}"

    @property
    def tracking_uri(self) -> str:
        return reveal(self.invocation().get("tracking_uri")) or f"sqlite:///{self.directory / 'mlflow.db'}"

    def optuna_study(self, summary: dict | None = None) -> str:
        """The Optuna study's name: the search's name, kept in the summary (the directory may be renamed)."""
        return (summary or {}).get("optuna_study") or self.name

    # -- trials --------------------------------------------------------------------------------------------------

    def trial_dir(self, row: dict) -> Path:
        """A summary row's trial directory (a repeat's row names its own)."""
        return Path(row["dir"]) if row.get("dir") else self.directory / trial_dir_name(row["trial"], row["trial_id"])

    def completed(self, summary: dict | None = None) -> list[dict]:
        """The completed trials with stored predictions — the search's, then its repeats' — each row with its
        `dir`, in one order whatever summary.json's (a resume reorders its rows)."""
        summary = summary or self.summary()
        rows = summary["rows"] + (summary.get("repeats") or {}).get("trials", [])
        done = [{**row, "dir": str(self.trial_dir(row))} for row in rows if row["status"] == "complete"
                and (self.trial_dir(row) / "predictions_val.csv").is_file()]
        return sorted(done, key=lambda row: Path(row["dir"]).name)

    @property
    def repeats_dir(self) -> Path:
        return self.directory / REPEATS_DIR

    @property
    def cv_dir(self) -> Path:
        return self.directory / CV_DIR

    # -- the ensemble and the record -----------------------------------------------------------------------------

    @property
    def ensemble_dir(self) -> Path:
        return self.directory / ENSEMBLE_DIR

    def ensemble(self) -> dict | None:
        """The latest selection (ensemble/ensemble.json), or None."""
        path = self.directory / ENSEMBLE_FILE
        if not path.is_file():
            return None
        ensemble = read_json(path, "an ensemble")
        checked(EnsembleRecord, ensemble, path)
        return ensemble

    def note_test_read(self, by: str) -> int:
        """Count one more read of the test labels (the record says how many there have been); returns the count."""
        path = self.directory / TEST_READS
        log = read_json(path, "a test-read log") if path.is_file() else []
        log.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": by})
        self.write_json(TEST_READS, log)
        return len(log)

    # -- the one writer: every file the search's steps leave in the directory -------------------------------------

    def file(self, name: str) -> Path:
        """`name` (`ensemble/members.csv`) as a path in the experiment directory; a name that leads out of it is a
        ValueError (a writer's slip, never a user's)."""
        root = self.directory.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or path == root:
            raise ValueError(f"{name}: not a file in {self.directory}")
        return path

    def write_text(self, name: str, text: str) -> Path:
        """A file in the experiment directory (its folder made), passwords in URLs masked, written whole or not at
        all: a temporary file beside it renamed over it, so a reader never sees half a file and a crash leaves the
        one before."""
        return self._replace(name, lambda tmp: tmp.write_text(mask(text)))

    def _replace(self, name: str, write) -> Path:
        """`write(tmp)` to a temporary file beside `name` (its folder made; the same suffix, which matplotlib
        reads; open, not mkstemp: the umask's permissions), then renamed over it; removed again if writing fails."""
        path = self.file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def write_json(self, name: str, value, schema: type[BaseModel] | None = None, indent: int | None = 1) -> Path:
        """`value` as JSON (write_text; `indent` None for a large one: report.json's arrays); with a `schema` (a
        record.models model), checked against it first: what does not fit is one ExperimentError naming the file and
        the field, and nothing is written."""
        text = json.dumps(mask(value), indent=indent, default=json_value)
        if schema is not None:
            checked(schema, json.loads(text), self.directory / name)
        return self.write_text(name, text)

    def write_table(self, name: str, frame: pd.DataFrame) -> dict:
        """A CSV (predictions, members) in the experiment directory; returns where and its content hash, what a
        later reader checks it reads the file it was told of."""
        path = self.write_text(name, frame.to_csv(index=False))
        return {"file": name, "sha256": file_sha256(path)}

    def write_figure(self, name: str, draw) -> Path:
        """A PNG drawn by `draw(path)` (figures.py), written whole as write_text's files are."""
        return self._replace(name, draw)

    def remove(self, name: str) -> None:
        """A file an earlier step left that no longer holds (an earlier selection's test predictions)."""
        self.file(name).unlink(missing_ok=True)

    # -- storage -------------------------------------------------------------------------------------------------

    def fetch(self, trial_dir: str, under: str = "") -> Path:
        """A trial's result files (RESULT_FILES) in the local experiment directory: with a local or mounted storage
        they are there already; from a remote one those files alone are fetched, not the trial's directory with
        its checkpoints and their optimizer state (a pruned trial, or one that errored, has none)."""
        local = self.directory / under / trial_dir
        if self.remote:
            for file in RESULT_FILES:
                download(f"{self.path}/{under + '/' if under else ''}{trial_dir}/{file}", local / file)
        return local

    def sync(self, names=(INVOCATION_FILE, SUMMARY_FILE, ENSEMBLE_DIR, REPORT_FILE)) -> None:
        """With a remote storage the search's own files go there too, beside Tune's: the machine that drove the
        search (a KubeRay head pod, say) may be gone when someone resumes or reads it."""
        if self.remote:
            for entry in names:
                if (self.directory / entry).exists():
                    upload(self.directory / entry, f"{self.path}/{entry}")

    def sync_resume(self) -> None:
        """What a `--resume` on another machine needs, to a remote storage: search.json, the MLflow parent's id and
        the default sqlite stores — each a consistent snapshot (sqlite's backup API), taken while they are written.
        Stores on a server (PostgreSQL, an MLflow server) need nothing. (MLflow artifacts in a local store stay on
        the machine that wrote them: an MLflow server keeps them in one place.)"""
        import sqlite3

        if not self.remote:
            return
        self.sync((INVOCATION_FILE, PARENT_ID_FILE))
        for name in SQLITE_STORES:
            if (self.directory / name).is_file():
                with tempfile.TemporaryDirectory() as tmp:
                    snapshot = Path(tmp) / name
                    with contextlib.closing(sqlite3.connect(self.directory / name)) as source, \
                            contextlib.closing(sqlite3.connect(snapshot)) as copy:
                        source.backup(copy)
                    upload(snapshot, f"{self.path}/{name}")

    def fetch_resume(self) -> None:
        """From a remote storage, what a resume needs and this machine lacks (a resume on another machine)."""
        if self.remote:
            for name in (INVOCATION_FILE, PARENT_ID_FILE, *SQLITE_STORES):
                if not (self.directory / name).is_file():
                    download(f"{self.path}/{name}", self.directory / name)

    # -- one search per name -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self):
        """One search owns its name: an exclusive lock (flock) on EXPERIMENT_DIR/.search.lock, taken before anything
        else is written, so a second start of the same name, or a --resume of it while it runs, is one error. The OS
        releases it on every exit, a crash included; the file then still names the crashed run, which is said and
        taken over. If the search fails before writing its invocation, what the lock made is removed again."""
        directory = self.directory
        made = next((p for p in [directory, *directory.parents] if p.parent.exists()), directory)
        made = None if made.exists() else made  # the topmost directory the search creates, to remove on a failure
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"--storage: cannot create {directory} ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1024).decode().strip()
            os.close(fd)
            raise ConfigError(f"search '{self.name}' is running ({holder}): wait for it to end, or give another "
                              "--name") from None
        try:
            stale = os.read(fd, 1024).decode().strip()
            if stale:
                print(f"note: the earlier run of '{self.name}' ({stale}) ended without releasing it (killed?); "
                      "taking over", file=sys.stderr)
            os.ftruncate(fd, 0)
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.pwrite(fd, holder.encode(), 0)
            yield
        except BaseException:
            if made is not None and not (directory / INVOCATION_FILE).exists():
                shutil.rmtree(made, ignore_errors=True)  # failed before writing anything: leave nothing
            raise
        finally:
            if (directory / LOCK_FILE).exists():
                os.ftruncate(fd, 0)  # released as it should be: nothing stale for the next run to report
            os.close(fd)  # closing releases the flock


def file_sha256(path: Path) -> str:
    """A file's content hash: what a later reader checks it reads the predictions it was told of."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
