"""The monitoring service (``alphapulse monitor``): scrapes the daemon, evaluates alert rules, tells people."""
