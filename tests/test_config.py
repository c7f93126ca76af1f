"""A bad config fails before the first request, naming the file, the sync and the field."""

from __future__ import annotations

import pytest

from connector import config
from connector.config import ConfigError
from vendor_cases.dfinery import dfinery_sync
from warehouse import make_users, run, user_row, write_config


@pytest.fixture
def base(sqlite_url, dfinery, tmp_path):
    make_users(sqlite_url, [user_row(i) for i in range(5)])
    return sqlite_url, tmp_path / "syncs.yaml"


def fails(path, sync_name="dfinery_users") -> ConfigError:
    with pytest.raises(ConfigError) as e:
        run(path, sync_name)
    return e.value


def test_unknown_column_names_file_sync_and_field(base, dfinery):
    url, path = base
    sync = dfinery_sync(dfinery.url)
    sync["mapping"] = sync["mapping"] + [{"column": "shoe_size", "attribute": "shoe", "type": "Long"}]
    write_config(path, url, [sync])
    err = fails(path)
    assert (err.file, err.sync, err.field) == (str(path), "dfinery_users", "mapping[7].column")
    assert "shoe_size" in str(err) and str(path) in str(err)
    assert dfinery.emulator.log == []


def test_unknown_vendor(base, dfinery):
    url, path = base
    write_config(path, url, [dfinery_sync(dfinery.url, vendor={"type": "salesforce"})])
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.sync == "dfinery_users" and e.value.field == "vendor.type" and "salesforce" in str(e.value)
    assert dfinery.emulator.log == []


def test_missing_secret_names_the_variable(base, dfinery, monkeypatch):
    url, path = base
    monkeypatch.delenv("TEST_DFINERY_TOKEN")
    write_config(path, url, [dfinery_sync(dfinery.url)])
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.field == "vendor.credentials.access_token" and "TEST_DFINERY_TOKEN" in str(e.value)
    assert dfinery.emulator.log == []


def test_literal_secret_in_yaml_is_refused(base, dfinery):
    url, path = base
    sync = dfinery_sync(dfinery.url)
    sync["vendor"]["credentials"] = {"access_token": "tok-secret-123"}
    write_config(path, url, [sync])
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert "environment" in str(e.value) and "tok-secret-123" not in str(e.value)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "syncs.yaml"
    path.write_text("warehouse: sqlite://\nsyncs:\n  - name: a\n    mapping: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.file == str(path) and "malformed YAML" in str(e.value) and e.value.field.startswith("line ")


@pytest.mark.parametrize("change, field, words", [
    (lambda s: s["mapping"][0].update(type="Money"), "mapping[0].type", "not a dfinery type"),
    (lambda s: s["mapping"][0].update(rule="increase"), "mapping[0].rule", "not a dfinery rule"),
    (lambda s: s["mapping"][1].update(attribute="membership"), "mapping[1].attribute", "mapped twice"),
    (lambda s: s["mapping"][0].update(null="unset"), "mapping[0].null", "cannot 'unset'"),
    (lambda s: s["vendor"].update(settings={}), "vendor.settings.service_id", "missing"),
    (lambda s: s.update(identity={"user_uuid": "user_id"}), "identity.user_uuid", "not an identity field"),
    (lambda s: s.update(chunk_size=0), "chunk_size", "greater than or equal to 1"),
    (lambda s: s.update(colour="blue"), "colour", "Extra inputs"),
])
def test_field_errors(base, dfinery, change, field, words):
    url, path = base
    sync = dfinery_sync(dfinery.url)
    change(sync)
    write_config(path, url, [sync])
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.sync == "dfinery_users" and e.value.field == field and words in str(e.value)


def test_unknown_table_and_cursor(base, dfinery):
    url, path = base
    write_config(path, url, [dfinery_sync(dfinery.url, source={"table": "customers"})])
    assert fails(path).field == "source.table"
    write_config(path, url, [dfinery_sync(dfinery.url, cursor="modified")])
    assert fails(path).field == "cursor"
    assert dfinery.emulator.log == []


def test_sql_file_source(base, dfinery):
    url, path = base
    (path.parent / "active.sql").write_text("SELECT * FROM users WHERE orders > 0;\n")
    write_config(path, url, [dfinery_sync(dfinery.url, source={"sql": "active.sql"})])
    s = run(path, "dfinery_users")
    assert s.users_delivered == 4  # user 0 has no orders
    write_config(path, url, [dfinery_sync(dfinery.url, source={"sql": "missing.sql"})])
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.field == "source.sql"


def test_non_strict_load_keeps_good_syncs(base, dfinery):
    url, path = base
    good = dfinery_sync(dfinery.url)
    bad = dfinery_sync(dfinery.url, name="broken", vendor={"type": "nope"})
    write_config(path, url, [good, bad])
    cfg, errors = config.load(path, strict=False)
    assert [s.name for s in cfg.syncs] == ["dfinery_users"] and list(errors) == ["broken"]
