"""This machine's physical limits, measured in the same run as MoltenIron's figures."""

from __future__ import annotations

import time
import uuid

import pymysql
from sqlalchemy import make_url

from bench.env import DB_URL


def db_commit_rate(seconds: float) -> float:
    """Single-row UPDATE + COMMIT per loop, PyMySQL straight: MariaDB's ceiling per commit."""
    url = make_url(DB_URL)
    name = f"molteniron_commit_{uuid.uuid4().hex[:8]}"
    conn = pymysql.connect(host=url.host or "127.0.0.1", port=url.port or 3306,
                           user=url.username or "root", password=url.password or "")
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE DATABASE `{name}`")
        cur.execute(f"CREATE TABLE `{name}`.t (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
        cur.execute(f"INSERT INTO `{name}`.t VALUES (1, 0)")
        conn.commit()
        done, end = 0, time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < end:
            cur.execute(f"UPDATE `{name}`.t SET v = v + 1 WHERE id = 1")
            conn.commit()
            done += 1
        rate = done / (time.perf_counter() - started)
        cur.execute(f"DROP DATABASE `{name}`")
        return round(rate, 1)
    finally:
        conn.close()
