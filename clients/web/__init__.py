"""molteniron-web: the pool on a web page and a JSON API, read-only.

It reads the pool through RabbitMQ, logged in as a broker user of its own, with
read-only operations only (summary, status without secrets, waiting, workers,
history), never the database. One thread owns the broker connection
(reader.py); every view's data is cached for at most CACHE_SECONDS, so ten open
browsers cost the worker what one does. The 24 h charts are sampled from
`summary` into this process's memory (series.py) and drawn as SVG on the server
(charts.py): the pages work with no internet and with scripts off; with scripts
on, static/live.js replaces the live part of a page every few seconds.
"""
