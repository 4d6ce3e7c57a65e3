"""The monitoring service (``alphapulse monitor``): a separate process that scrapes the trading daemon and the
host, evaluates alert rules, keeps the alert history, serves it over HTTP on 127.0.0.1 and tells people (issue 10).

Modules, one job each: :mod:`settings` (monitoring.yaml + environment), :mod:`rules` (pure: a sample in, alert
transitions out), :mod:`store` (SQLite: samples and alert history), :mod:`scraper` (the daemon's /health and
/metrics, the host's CPU/memory/disk), :mod:`server` (the HTTP API), :mod:`service` (the process: systemd
notifications, the scrape loop, signals), :mod:`delivery` (alerts to webhooks, Slack, Telegram, e-mail).
"""
