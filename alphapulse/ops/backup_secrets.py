"""Secrets in the configuration files a backup copies: found by key name, left out, and merged back on restore.

A backup without ``--include-secrets`` must not carry the exchange keys or tokens, yet should restore a working
configuration: secret assignments in ``*.env`` files are commented out with a marker, and a restore puts the
value of the file in place back on that line (:func:`merge_env`).  Secret YAML scalars are blanked (an empty
``control.token`` makes the daemon use its ``control_token`` file).  Names count as secret by the log redactor's
rule (:func:`alphapulse.log.is_secret_key`), the daemon's own credential variables, and any ``*_KEY``.
"""

from __future__ import annotations

import re

from alphapulse.config import SECRET_ENV
from alphapulse.log import is_secret_key

LEFT_OUT = "# left out of this backup (secret)"

_ENV_LINE = re.compile(r"^(\s*(?:export\s+)?)([A-Za-z_][A-Za-z0-9_]*)(\s*=)(.*)$")
_LEFT_OUT_LINE = re.compile(r"^# ([A-Za-z_][A-Za-z0-9_]*)= +" + re.escape(LEFT_OUT) + r"$")
_YAML_LINE = re.compile(r"^(\s*)([A-Za-z0-9_\-]+)(\s*:\s*)(\S.*?)\s*$")
_YAML_EMPTY = ('""', "''", "~", "null")


def is_secret_env(name: str) -> bool:
    """Exchange keys, tokens, passphrases and any ``*_KEY`` (the backup key itself, cloud keys)."""
    return name in SECRET_ENV or name.upper().endswith("_KEY") or is_secret_key(name)


_COMMENTED = re.compile(r"^\s*#+\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")
COMMENTED_OUT = "# (an old, commented-out value was left out of this backup)"


def sanitize_env(text: str) -> tuple[str, list[str]]:
    """An env file with every non-empty secret assignment commented out; returns (text, keys left out).

    A commented-out assignment of a secret (an old key kept "just in case") loses its value too, with a marker
    that :func:`merge_env` does not turn back into an active line."""
    out, left = [], []
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\n")
        m = _ENV_LINE.match(bare)
        if m and is_secret_env(m.group(2)) and m.group(4).strip().strip("'\""):
            left.append(m.group(2))
            line = f"# {m.group(2)}=  {LEFT_OUT}\n"
        elif (c := _COMMENTED.match(bare)) and is_secret_env(c.group(1)) and c.group(2).strip().strip("'\"") \
                and not bare.endswith(LEFT_OUT):
            left.append(f"{c.group(1)} (commented out)")
            line = f"# {c.group(1)}=  {COMMENTED_OUT}\n"
        out.append(line)
    return "".join(out), left


def merge_env(backed_up: str, current: str | None) -> str:
    """The env file a restore writes: the backup's, with each secret it left out taken from the file in place."""
    if current is None:
        return backed_up
    have: dict[str, str] = {}
    for line in current.splitlines():
        m = _ENV_LINE.match(line)
        if m:
            have[m.group(2)] = line
    out = []
    for line in backed_up.splitlines(keepends=True):
        m = _LEFT_OUT_LINE.match(line.rstrip("\n"))
        if m and m.group(1) in have:
            line = have[m.group(1)] + "\n"
        out.append(line)
    return "".join(out)


_YAML_KEY = re.compile(r"^(\s*)([A-Za-z0-9_\-]+)\s*:(?:\s|$)")


def _yaml_paths(lines: list[str]) -> list[tuple[str, ...] | None]:
    """The dotted path of the mapping key on each line (None for other lines), from indentation alone: enough
    for the block-style configuration files the daemon reads, without a YAML round trip that drops comments."""
    stack: list[tuple[int, str]] = []
    out: list[tuple[str, ...] | None] = []
    for line in lines:
        m = _YAML_KEY.match(line)
        if m is None:
            out.append(None)
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        out.append(tuple(k for _, k in stack))
    return out


def sanitize_yaml(text: str) -> tuple[str, list[str]]:
    """A YAML file with secret scalar values (``token: abc``) blanked, comments and layout kept; returns the
    text and the dotted keys left out."""
    lines = text.splitlines(keepends=True)
    out, left = [], []
    skip_deeper: int | None = None  # the indent of a secret block scalar whose continuation lines are dropped
    for line, path in zip(lines, _yaml_paths(lines)):
        if skip_deeper is not None:
            if not line.strip() or len(line) - len(line.lstrip()) > skip_deeper:
                continue
            skip_deeper = None
        m = _YAML_LINE.match(line.rstrip("\n"))
        if m and path and is_secret_key(m.group(2)):
            value = m.group(4).split(" #")[0].strip()
            if value and value not in _YAML_EMPTY and not value.startswith("#"):
                left.append(".".join(path))
                line = f'{m.group(1)}{m.group(2)}{m.group(3)}""  {LEFT_OUT}\n'
                if value.startswith(("|", ">")):  # a block scalar: its text is on the more-indented lines below
                    skip_deeper = len(m.group(1))
        out.append(line)
    return "".join(out), left


def merge_yaml(backed_up: str, current: str | None) -> str:
    """The YAML file a restore writes: the backup's, with each secret value it left out taken from the file in
    place when that file has the same key (same dotted path)."""
    if current is None:
        return backed_up
    cur_lines = current.splitlines(keepends=True)
    have = {p: ln if ln.endswith("\n") else ln + "\n" for ln, p in zip(cur_lines, _yaml_paths(cur_lines)) if p}
    lines = backed_up.splitlines(keepends=True)
    out = []
    for line, path in zip(lines, _yaml_paths(lines)):
        if (path and line.rstrip("\n").endswith(LEFT_OUT) and path in have and LEFT_OUT not in have[path]
                and not have[path].split(" #")[0].rstrip().endswith(("|", ">", "|-", ">-", ":"))):  # one-line only
            line = have[path]
        out.append(line)
    return "".join(out)
