"""``syncs.yaml``: load, interpolate ``${ENV}``, validate — and say exactly what is wrong.

Every error names the file, the sync and the field, and is raised before any request.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from connector import vendors
from connector.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Attribute(_Model):
    """One mapped column: where it comes from and how the vendor takes it."""

    column: str
    attribute: str
    type: str
    rule: str = "set"
    null: Literal["skip", "unset", "send"] = "skip"


class Source(_Model):
    table: str | None = None
    sql: str | None = None  # a file path, relative to the config file

    @model_validator(mode="after")
    def _one(self) -> Source:
        if (self.table is None) == (self.sql is None):
            raise ValueError("give exactly one of 'table' or 'sql'")
        return self


class VendorConfig(_Model):
    type: str
    base_url: str | None = None
    conn_id: str | None = None  # Airflow connection id; else credentials below
    credentials: dict[str, str] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    rate_limit: float | None = Field(None, gt=0, description=(
        "the vendor's limit for this account, per second, in the vendor's unit (requests; users for MoEngage), "
        "over the vendor's window; default: the documented limit"))
    concurrency: int | None = Field(None, ge=1, le=256, description=(
        "most requests in flight at once; default: as many as the answer times need, up to 128"))
    timeout: tuple[float, float] = (5.0, 30.0)
    max_attempts: int = Field(5, ge=1, le=20)
    backoff: float = Field(0.5, ge=0, description="first retry delay in seconds, doubled each attempt")
    verify_tls: bool = True


class Guard(_Model):
    """Blast-radius guard: refuse implausibly large changes unless overridden."""

    max_changed_fraction: float = Field(0.5, gt=0, le=1)
    max_nulled_fraction: float = Field(0.3, gt=0, le=1)
    min_users: int = Field(100, ge=0)  # below this snapshot size the guard stays quiet


class SyncSpec(_Model):
    name: str
    source: Source
    identity: str | list[str] | dict[str, str]
    cursor: str | None = None
    vendor: VendorConfig
    mapping: list[Attribute] = Field(min_length=1)
    schedule: str | None = "@daily"
    tags: list[str] = Field(default_factory=list)
    max_failure_fraction: float = Field(0.05, ge=0, le=1)
    # a value the vendor can never take: set aside that attribute (the rest of the user is
    # delivered), or the whole user
    on_invalid: Literal["attribute", "user"] = "attribute"
    chunk_size: int = Field(50_000, ge=1)
    shards: int = Field(4, ge=1, le=256)
    guard: Guard = Guard()
    # attributes that, once they leave the mapping, are unset at the vendor (where it can unset);
    # by default a removed attribute is only no longer synced: the vendor keeps its values
    unset_removed: list[str] = Field(default_factory=list)
    # seconds without a heartbeat after which a run's lock is presumed dead and taken over
    lock_timeout: float = Field(600.0, gt=0)

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits and underscores, starting with a letter")
        return v

    @property
    def identity_columns(self) -> dict[str, str]:
        """Vendor identity field -> source column."""
        if isinstance(self.identity, dict):
            return dict(self.identity)
        cols = [self.identity] if isinstance(self.identity, str) else list(self.identity)
        default = vendors.get(self.vendor.type).identity_fields[0]
        return {default: cols[0], **{c: c for c in cols[1:]}}


class Config(_Model):
    warehouse: str
    state: str | None = None
    syncs: list[SyncSpec]
    path: Path = Path("syncs.yaml")

    @property
    def state_url(self) -> str:
        return self.state or self.warehouse

    def sync(self, name: str) -> SyncSpec:
        for s in self.syncs:
            if s.name == name:
                return s
        raise ConfigError(self.path, f"no sync named '{name}' (have: {', '.join(s.name for s in self.syncs)})")

    def sql_text(self, spec: SyncSpec) -> str | None:
        if spec.source.sql is None:
            return None
        return (self.path.parent / spec.source.sql).read_text()


def load(path: str | Path, *, strict: bool = True) -> tuple[Config, dict[str, ConfigError]]:
    """Read and validate a config file.

    With ``strict`` any bad sync raises. Without, bad syncs are left out and returned
    by name, so one broken sync does not take the others down (the DAG factory uses this).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise ConfigError(path, f"malformed YAML: {getattr(e, 'problem', e)}", field=where) from None
    if not isinstance(raw, dict):
        raise ConfigError(path, "expected a mapping with 'warehouse' and 'syncs'")
    unknown = set(raw) - {"warehouse", "state", "syncs"}
    if unknown:
        raise ConfigError(path, f"unknown key(s): {', '.join(sorted(unknown))}")
    for key in ("warehouse", "syncs"):
        if key not in raw:
            raise ConfigError(path, "missing", field=key)
    warehouse = _interpolate(raw["warehouse"], path, None, "warehouse")
    state = _interpolate(raw.get("state"), path, None, "state")
    if not isinstance(raw["syncs"], list):
        raise ConfigError(path, "expected a list of syncs", field="syncs")

    good: list[SyncSpec] = []
    bad: dict[str, ConfigError] = {}
    seen: set[str] = set()
    for i, item in enumerate(raw["syncs"]):
        name = item.get("name") if isinstance(item, dict) else None
        label = name if isinstance(name, str) else f"#{i + 1}"
        try:
            if name in seen:
                raise ConfigError(path, "duplicate sync name", sync=label, field="name")
            seen.add(name)
            good.append(_sync(item, path, label))
        except ConfigError as e:
            if strict:
                raise
            bad[label] = e
    return Config(warehouse=warehouse, state=state, syncs=good, path=path), bad


def _sync(item: Any, path: Path, label: str) -> SyncSpec:
    if not isinstance(item, dict):
        raise ConfigError(path, "expected a mapping", sync=label)
    vendor_raw = item.get("vendor") if isinstance(item.get("vendor"), dict) else {}
    vtype = vendor_raw.get("type")
    if vtype not in vendors.names():
        raise ConfigError(path, f"unknown vendor {vtype!r} (known: {', '.join(vendors.names())})", label, "vendor.type")
    cls = vendors.get(vtype)
    for key, value in (vendor_raw.get("credentials") or {}).items():
        if isinstance(value, str) and not _VAR.search(value):
            raise ConfigError(path, "secrets must come from the environment, e.g. ${MY_TOKEN}", label,
                              f"vendor.credentials.{key}")
    item = _interpolate(item, path, label, "")
    for entry in item.get("mapping") or []:  # YAML reads an unquoted `null:` key as None
        if isinstance(entry, dict) and None in entry:
            entry["null"] = entry.pop(None)
    try:
        spec = SyncSpec.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        raise ConfigError(path, err["msg"], label, field) from None
    if spec.source.sql and not (path.parent / spec.source.sql).is_file():
        raise ConfigError(path, f"SQL file not found: {path.parent / spec.source.sql}", label, "source.sql")
    for field, message in _check_vendor(spec, cls):
        raise ConfigError(path, message, label, field)
    return spec


def _check_vendor(spec: SyncSpec, cls: type[vendors.Vendor]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    creds = spec.vendor.credentials
    if not spec.vendor.conn_id:
        problems += [(f"vendor.credentials.{c}", "missing (or set vendor.conn_id)") for c in cls.credentials if c not in creds]
    problems += [(f"vendor.credentials.{c}", f"unknown credential (expected: {', '.join(cls.credentials)})")
                 for c in creds if c not in cls.credentials]
    problems += [(f"vendor.settings.{k}", f"unknown setting (expected: {', '.join(cls.settings) or 'none'})")
                 for k in spec.vendor.settings if k not in cls.settings]
    if not spec.vendor.conn_id:
        problems += [(f"vendor.settings.{k}", f"missing (a {cls.name} setting; or set vendor.conn_id)")
                     for k in cls.required_settings if k not in spec.vendor.settings]
    if isinstance(spec.identity, dict):
        problems += [(f"identity.{f}", f"not an identity field of {cls.name} (expected: {', '.join(cls.identity_fields)})")
                     for f in spec.identity if f not in cls.identity_fields]
    attrs: set[str] = set()
    for i, a in enumerate(spec.mapping):
        where = f"mapping[{i}]"
        if a.type.lower() not in cls.types:
            problems.append((f"{where}.type", f"{a.type!r} is not a {cls.name} type (expected: {', '.join(cls.types)})"))
        if a.rule not in cls.rules:
            problems.append((f"{where}.rule", f"{a.rule!r} is not a {cls.name} rule (expected: {', '.join(cls.rules)})"))
        elif cls.rules[a.rule] in ("increase",) and a.type.lower() in cls.types and not cls.types[a.type.lower()].numeric:
            problems.append((f"{where}.rule", f"rule {a.rule!r} needs a numeric type, not {a.type!r}"))
        elif cls.rules[a.rule] in ("append", "list") and a.type.lower() in cls.types and cls.types[a.type.lower()].kind != "list":
            problems.append((f"{where}.rule", f"rule {a.rule!r} needs a list type, not {a.type!r}"))
        if a.null not in cls.null_policies:
            problems.append((f"{where}.null", f"{cls.name} cannot {a.null!r} a NULL (allowed: {', '.join(sorted(cls.null_policies))})"))
        if a.attribute in attrs:
            problems.append((f"{where}.attribute", f"attribute {a.attribute!r} is mapped twice"))
        attrs.add(a.attribute)
    if spec.unset_removed and "unset" not in cls.null_policies:
        problems.append(("unset_removed", f"{cls.name} has no way to unset an attribute; remove the values in "
                                          f"its console instead"))
    problems += [("unset_removed", f"attribute {a!r} is still mapped; unset_removed names attributes that "
                                   "left the mapping") for a in spec.unset_removed if a in attrs]
    problems += list(cls.validate(spec))
    return problems


def _interpolate(value: Any, path: Path, sync: str | None, field: str) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise ConfigError(path, f"environment variable {var} is not set", sync, field or None)
        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, path, sync, f"{field}.{k}" if field else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path, sync, f"{field}[{i}]") for i, v in enumerate(value)]
    return value
