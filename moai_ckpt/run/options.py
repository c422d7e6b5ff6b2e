"""`RunOptions`: every setting of a fault-tolerant run, validated once, from code, environment or a file.

One frozen model serves `fault_tolerant`, `Run` and the framework integrations. It is built from
four places, each overriding the ones after it:

1. explicit arguments (``fault_tolerant(snapshot_every=50)``, ``RunOptions(snapshot_every=50)``);
2. environment variables ``MOAI_CKPT_<FIELD>`` (``MOAI_CKPT_SNAPSHOT_EVERY=50``; nested fields
   with ``__``: ``MOAI_CKPT_CHECKPOINTER__COLLECTIVE_TIMEOUT_S=60``; ``null`` for None);
3. a TOML or YAML file named by ``config_file`` (an argument, or ``MOAI_CKPT_CONFIG_FILE``);
4. the defaults below.

See docs/configuration.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from moai_ckpt.checkpointer import CheckpointerOptions
from moai_ckpt.retention import RetentionPolicy, policies_of

__all__ = ["CONFIG_FILE_ENV", "ENV_PREFIX", "CapturePolicy", "RunOptions"]

ENV_PREFIX = "MOAI_CKPT_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"
CapturePolicy = Literal["never", "on_divergence", "after_snapshot"]
CAPTURE_POLICIES: tuple[str, ...] = CapturePolicy.__args__  # type: ignore[attr-defined]


class RunOptions(BaseSettings):
    """How a fault-tolerant run snapshots, logs and captures (fields and sources: docs/configuration.md).

    Keyword arguments of `fault_tolerant` and `Run` build one (`RunOptions.of`); any
    `CheckpointerOptions` field among them goes to ``checkpointer``, anything else to
    ``storage_options``.
    """

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_parse_none_str="null",
    )

    storage: str = Field(
        description="the run directory (any fsspec URL); `{name}` fields are filled from the keyword arguments "
        "of a `fault_tolerant` function's call"
    )
    snapshot_every: int | None = Field(default=100, ge=1, description="steps between snapshots (None: time only)")
    snapshot_every_s: float | None = Field(
        default=None,
        gt=0,
        description="also snapshot once this many seconds passed since the last one (rank 0's clock)",
    )
    async_snapshots: bool = Field(default=True, description="write snapshots in the background (`save_async`)")
    snapshot_at_end: bool = Field(default=True, description="snapshot the last step when the loop finishes")
    local_tier: str | None = Field(
        default=None,
        description="a local directory (host shared memory, e.g. /dev/shm/moai) for each rank's latest snapshot, "
        "written every local_every steps; a restart takes the newest valid snapshot of either tier",
    )
    local_every: int | None = Field(default=None, ge=1, description="steps between snapshots to the local tier")
    log_flush_every: int = Field(default=1, ge=1, description="log records per durable segment")
    log_flush_seconds: float | None = Field(
        default=None, gt=0, description="with log_flush_every > 1, a group of records is never older than this"
    )
    log_sync: bool = Field(default=False, description="a step's record is durable before the next step starts")
    log_lag: int = Field(
        default=1,
        ge=0,
        description="otherwise a step's record is durable before the log_lag-th step after it completes "
        "(0: as log_sync)",
    )
    state_digests: bool = Field(
        default=True,
        description="log the exact digest of the whole tracked state after every step (checked on replay)",
    )
    capture_ops: CapturePolicy = Field(
        default="on_divergence", description="when a step's aten op stream is captured (see docs/ops.md)"
    )
    deterministic: bool = Field(
        default=False, description="torch.use_deterministic_algorithms(True) and the environment it needs"
    )
    record_args: frozenset[str] | None = Field(
        default=None, description="the only arguments run.json records (default: all but secret-looking ones)"
    )
    keep: tuple[RetentionPolicy, ...] | None = Field(
        default=None,
        description="retention policies applied after each commit, snapshots and their logs "
        "(an int N: the last N; a list: a snapshot any policy keeps stays; None: keep all)",
    )
    checkpointer: CheckpointerOptions = Field(default_factory=CheckpointerOptions, description="Checkpointer options")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options of the run directory")
    config_file: str | None = Field(
        default=None, description="a TOML or YAML file of options (below env and arguments)"
    )

    @classmethod
    def of(cls, storage: str | None = None, **kwargs: Any) -> RunOptions:
        """Options from ``fault_tolerant``-style keywords: run options, `Checkpointer` options, storage options."""
        fields: dict[str, Any] = {} if storage is None else {"storage": storage}
        checkpointer: dict[str, Any] = dict(kwargs.pop("checkpointer", None) or {})
        storage_options: dict[str, Any] = dict(kwargs.pop("storage_options", None) or {})
        for key, value in kwargs.items():
            if key in cls.model_fields:
                fields[key] = value
            elif key in CheckpointerOptions.model_fields:
                checkpointer[key] = value
            else:
                storage_options[key] = value
        if checkpointer:
            fields["checkpointer"] = checkpointer
        if storage_options:
            fields["storage_options"] = storage_options
        return cls(**fields)

    @classmethod
    def from_call(
        cls, caller: str, storage: str | None, options: RunOptions | None, kwargs: dict[str, Any]
    ) -> RunOptions:
        """The options a call of ``caller`` passed: ``options`` (``storage`` replacing its own), or keywords (`of`).

        Raises:
            TypeError: both ``options`` and keyword options.
        """
        if options is None:
            return cls.of(storage, **kwargs)
        if kwargs:
            raise TypeError(f"{caller}: pass options= or keyword options, not both (got {', '.join(kwargs)})")
        return options if storage is None else options.model_copy(update={"storage": storage})

    @property
    def lag(self) -> int:
        """How many completed steps a record may trail by (0: durable before the next step starts)."""
        return 0 if self.log_sync else self.log_lag

    @field_validator("capture_ops", mode="before")
    @classmethod
    def _known_policy(cls, policy: Any) -> Any:
        if policy not in CAPTURE_POLICIES:
            raise ValueError(f"capture_ops must be one of {', '.join(CAPTURE_POLICIES)}, got {policy!r}")
        return policy

    @field_validator("keep", mode="before")
    @classmethod
    def _policies(cls, keep: Any) -> Any:
        return policies_of(keep) if keep is not None else None

    @field_validator("record_args", mode="before")
    @classmethod
    def _argument_names(cls, names: Any) -> Any:
        if names is None:
            return None
        if isinstance(names, str) or not isinstance(names, Iterable) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"record_args must be a collection of argument names, got {names!r}")
        return frozenset(names)

    @model_validator(mode="after")
    def _some_schedule(self) -> RunOptions:
        if self.snapshot_every is None and self.snapshot_every_s is None:
            raise ValueError("set snapshot_every, snapshot_every_s or both")
        if self.checkpointer.keep is not None:
            raise ValueError("a run's retention is the option keep (it prunes the logs too), not checkpointer.keep")
        if (self.local_tier is None) != (self.local_every is None):
            raise ValueError("local_tier and local_every go together: set both (or neither)")
        if self.local_tier is not None and "://" in self.local_tier and not self.local_tier.startswith("file://"):
            raise ValueError(f"local_tier must be a local directory (host memory or disk), got {self.local_tier!r}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit arguments, then ``MOAI_CKPT_*`` variables, then the config file (no dotenv, no secrets dir)."""
        given = getattr(init_settings, "init_kwargs", {}).get("config_file") or os.environ.get(CONFIG_FILE_ENV)
        sources = [init_settings, env_settings]
        if given:
            sources.append(_file_source(settings_cls, Path(given)))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """The source that reads ``path`` by its suffix; a missing file is an error, not an empty config."""
    if not path.is_file():
        raise ValueError(f"config_file: {path} is not a file")
    if path.suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if path.suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise ValueError(f"config_file: {path} is neither .toml nor .yaml/.yml")
