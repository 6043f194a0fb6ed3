-- MoltenIron's database and the worker's account (clients never touch the database).
--   mariadb < deploy/create-database.sql          (as a user who may create users)
-- Re-running it changes nothing that exists: the account keeps its password.
--
-- The account is created locked and without a password: nobody can log in as it
-- until you give it the one deploy/install.sh wrote to /etc/molteniron/environment
-- (README "Deploying"):
--   ALTER USER 'molteniron'@'%' IDENTIFIED BY '...' ACCOUNT UNLOCK;
-- '%' lets the worker connect from any host: name the workers' hosts instead where
-- you can (one CREATE USER and GRANT per host).
CREATE DATABASE IF NOT EXISTS molteniron CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE USER IF NOT EXISTS 'molteniron'@'%' ACCOUNT LOCK;

-- What the worker needs, and nothing more (tests/test_deploy_kit.py runs the worker
-- and its migrations with exactly these):
--   serving requests: SELECT, INSERT, UPDATE, DELETE (no TRUNCATE, no locks, no
--   temporary tables, no triggers, views or routines);
--   the schema migrations (molteniron/migrations/versions/*.py, run by the worker at
--   start or by `molteniron-worker --migrate-only`; `CREATE DATABASE IF NOT EXISTS`
--   on this database): CREATE (tables, alembic_version), ALTER (add and alter
--   columns), INDEX (create_index), REFERENCES (the foreign key node_ips.node_id ->
--   nodes.id: MySQL checks it, MariaDB does not).
-- Not DROP: no migration drops a table on the way up; downgrading is an
-- administrator's job, with an account of their own.
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, REFERENCES
  ON molteniron.* TO 'molteniron'@'%';
