"""``alphapulse monitor``: a separate process that watches the trading daemon and the host, raises alerts and
serves them over HTTP on 127.0.0.1 (issue 10).

Modules, one job each: :mod:`settings` (monitoring.yaml + environment), :mod:`rules` (pure: a sample in, alert
transitions out), :mod:`store` (SQLite: samples and alert history), :mod:`scraper` (the daemon's /health and
/metrics, the host's CPU/memory/disk), :mod:`server` (the HTTP API), :mod:`service` (the process: systemd
notifications, the scrape loop, signals).
"""
