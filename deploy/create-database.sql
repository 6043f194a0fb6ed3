-- The database and an account for the worker (clients never touch the database).
-- Then `molteniron-worker --migrate-only` creates the tables.
CREATE DATABASE IF NOT EXISTS molteniron CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE USER IF NOT EXISTS 'molteniron'@'%' IDENTIFIED BY 'change-me';
GRANT ALL PRIVILEGES ON molteniron.* TO 'molteniron'@'%';
