CREATE TABLE sync_batches (
	batch_id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	sync VARCHAR(100) NOT NULL, 
	shard INTEGER NOT NULL, 
	users INTEGER NOT NULL, 
	first_user VARCHAR(255), 
	attributes TEXT, 
	http_status INTEGER, 
	vendor_code VARCHAR(40), 
	vendor_message TEXT, 
	attempts INTEGER NOT NULL, 
	latency_ms INTEGER, 
	outcome VARCHAR(20) NOT NULL, 
	sent_at DATETIME NOT NULL, 
	worker VARCHAR(250), 
	task VARCHAR(250), 
	PRIMARY KEY (batch_id)
);

CREATE INDEX ix_sync_batches_run_id ON sync_batches (run_id);

CREATE TABLE sync_cursors (
	sync VARCHAR(100) NOT NULL, 
	watermark VARCHAR(100) NOT NULL, 
	run_id INTEGER, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (sync)
);

CREATE TABLE sync_failures (
	sync VARCHAR(100) NOT NULL, 
	user_key VARCHAR(255) NOT NULL, 
	attribute VARCHAR(255) DEFAULT '' NOT NULL, 
	identity TEXT NOT NULL, 
	run_id INTEGER, 
	error_class VARCHAR(20) NOT NULL, 
	code VARCHAR(40), 
	message TEXT, 
	attempts INTEGER NOT NULL, 
	first_seen DATETIME NOT NULL, 
	last_seen DATETIME NOT NULL, 
	value_hash BIGINT, 
	PRIMARY KEY (sync, user_key, attribute)
);

CREATE TABLE sync_locks (
	sync VARCHAR(100) NOT NULL, 
	run_id INTEGER NOT NULL, 
	owner VARCHAR(200) NOT NULL, 
	acquired_at DATETIME NOT NULL, 
	heartbeat_at DATETIME NOT NULL, 
	PRIMARY KEY (sync)
);

CREATE TABLE sync_mappings (
	sync VARCHAR(100) NOT NULL, 
	attribute VARCHAR(255) NOT NULL, 
	spec TEXT NOT NULL, 
	since_run INTEGER, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (sync, attribute)
);

CREATE TABLE sync_plan (
	run_id INTEGER NOT NULL, 
	user_key VARCHAR(255) NOT NULL, 
	shard INTEGER NOT NULL, 
	identity TEXT NOT NULL, 
	source_identity TEXT NOT NULL, 
	ops TEXT NOT NULL, 
	payload TEXT NOT NULL, 
	row_hash BIGINT NOT NULL, 
	status VARCHAR(20) NOT NULL, 
	in_flight TEXT, 
	PRIMARY KEY (run_id, user_key)
);

CREATE INDEX ix_sync_plan_shard ON sync_plan (run_id, shard, status);

CREATE TABLE sync_runs (
	run_id INTEGER NOT NULL, 
	sync VARCHAR(100) NOT NULL, 
	vendor VARCHAR(40) NOT NULL, 
	mode VARCHAR(20) NOT NULL, 
	"trigger" VARCHAR(250) NOT NULL, 
	status VARCHAR(20) NOT NULL, 
	started_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	users_read INTEGER, 
	users_changed INTEGER, 
	users_delivered INTEGER, 
	users_rejected INTEGER, 
	users_failed INTEGER, 
	requests INTEGER, 
	watermark_from VARCHAR(100), 
	watermark_to VARCHAR(100), 
	error TEXT, 
	mapping_change TEXT, 
	PRIMARY KEY (run_id)
);

CREATE INDEX ix_sync_runs_sync ON sync_runs (sync);

CREATE TABLE sync_snapshot (
	sync VARCHAR(100) NOT NULL, 
	user_key VARCHAR(255) NOT NULL, 
	payload TEXT NOT NULL, 
	row_hash BIGINT NOT NULL, 
	run_id INTEGER, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (sync, user_key)
);
