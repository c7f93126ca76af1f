-- usersync demo warehouse (SQLite dialect)
--
-- One wide `users` table, the kind of model a reverse ETL sync reads from.
-- Loaded and mutated by connector/demo.py (`make demo`, tests).
--
-- Conventions:
--   * datetimes are TEXT 'YYYY-MM-DD HH:MM:SS' in UTC; dates are TEXT 'YYYY-MM-DD'
--   * booleans are INTEGER 0/1
--   * `interests` is TEXT holding a JSON array of strings
--   * `updated_at` is the incremental cursor: set whenever a row changes
--   * `internal_note` is never mapped by syncs (changing it must send nothing)
--
-- Note for editors: connector/demo.py strips `--` comments and splits on `;`,
-- so keep both out of string literals in this file.

CREATE TABLE users (
    user_id          TEXT    NOT NULL PRIMARY KEY,          -- 'u000123'
    numeric_id       INTEGER NOT NULL UNIQUE,               -- 64-bit-safe long id (EngageLab/Jiguang)
    email            TEXT    NOT NULL,
    phone            TEXT,                                  -- E.164, e.g. '+8613800001234'
    first_name       TEXT    NOT NULL,
    last_name        TEXT    NOT NULL,
    country          TEXT    NOT NULL,                      -- ISO 3166-1 alpha-2
    city             TEXT    NOT NULL,
    language         TEXT    NOT NULL,                      -- ISO 639-1, e.g. 'en', 'zh', 'ko', 'ja'
    plan             TEXT    NOT NULL CHECK (plan IN ('free', 'pro', 'enterprise')),
    lifetime_value   REAL    NOT NULL DEFAULT 0,            -- 2 decimals
    orders_count     INTEGER NOT NULL DEFAULT 0,
    points           INTEGER NOT NULL DEFAULT 0,            -- only ever grows
    is_subscribed    INTEGER NOT NULL CHECK (is_subscribed IN (0, 1)),
    marketing_opt_in INTEGER CHECK (marketing_opt_in IN (0, 1)),  -- NULL = never asked
    signup_at        TEXT    NOT NULL,
    last_seen_at     TEXT,
    birthday         TEXT,
    interests        TEXT,                                  -- JSON array, e.g. '["music","travel"]'
    internal_note    TEXT,                                  -- unmapped on purpose
    updated_at       TEXT    NOT NULL                       -- cursor column
);

CREATE INDEX users_updated_at_idx ON users (updated_at);
