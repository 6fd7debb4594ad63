"""Values that decide: numbers that carry an event's outcome stay visible to the model (issue 21, case 5).

drain3's masks turn every number into `<*>`, and a `<*>` merges lines into one template (tasks.detection.drain_rules),
which is right for ids and counters and wrong for the few numbers that are the outcome (Drain3#11, #58: masked
values are parameters for a separate anomaly step, which this project does not have). So before masking, an
outcome-bearing number is rewritten to its class, written like a masked value but named: `<*>` is "some value",
`<server-error>` is "a value of class server error". A class holds no digit, so no mask touches it and no
wildcard stands for it: `HTTP 200` and `HTTP 502` are two templates with two verdicts, while `HTTP 502` and
`HTTP 504` stay one.

The classes, each from its standard:
- HTTP status codes (RFC 9110, section 15): `<informational>`, `<success>`, `<redirection>`, `<client-error>`,
  `<server-error>` for 1xx-5xx, where the number stands as a status: after `HTTP/x.y"` (common/combined access log),
  after `HTTP/x.y` (a status line), after `HTTP`, or as a `status`/`status_code`/`http_status`/`response_code`
  key's value.
- Exit codes and signals (POSIX shells: 128 + N is death by signal N; systemd's `status=N/NAME`): `<exit-success>`
  for 0, `<killed-by-SIGKILL>` (and the other signal names) for 129-159 where N names a signal, `<exit-failure>`
  otherwise; after `exit code`, `exit status`, `exited with [code|status]`, `exit_code=`, `exitCode=`,
  `return code`, `returncode=`, `status=N/NAME`.
- Syslog priority (RFC 5424, section 6.2.1; RFC 3164's `<PRI>` too) at the start of a line: `<facility.severity>`,
  e.g. `<11>` → `<user.err>`; journald's PRIORITY and SYSLOG_FACILITY fields get the same label
  (tasks.detection.envelopes).
"""

from __future__ import annotations

import re
import signal
from typing import Any

HTTP_CLASSES = {1: "informational", 2: "success", 3: "redirection", 4: "client-error", 5: "server-error"}
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")  # RFC 5424 Table 2
FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp",
              "ntp", "audit", "console", "cron2", *(f"local{n}" for n in range(8)))  # RFC 5424 Table 1
_HTTP = re.compile(
    r"(?P<lead>HTTP/\d(?:\.\d)?\"?\s+|\bHTTP\s+|\b(?:status|status_code|statusCode|http_status|response_code)"
    r"\"?\s*[=:]\s*\"?)(?P<code>[1-5]\d\d)(?!\w|\.\d)")
_EXIT = re.compile(
    r"(?P<lead>\bexit(?:ed)?\s+(?:code|status)\s*[=:]?\s*|\bexited\s+with\s+(?:code\s+|status\s+)?|"
    r"\bexit_?[cC]ode\"?\s*[=:]\s*\"?|\breturn\s?code\s*[=:]?\s*|\bstatus=(?=\d+/[A-Z]))(?P<code>\d{1,3})(?!\w|\.\d)")
_PRI = re.compile(r"^<(?P<pri>\d{1,3})>")


def exit_class(code: int) -> str:
    """`exit-success`, `killed-by-<SIGNAME>` (128 + a signal number) or `exit-failure` for an exit status."""
    if code == 0:
        return "exit-success"
    if 128 < code < 160:
        try:
            return f"killed-by-{signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return "exit-failure"


def priority_label(priority: Any, facility: Any = None) -> str:
    """`<facility.severity>` (or `<severity>` without a facility) for a syslog/journald priority; '' if unreadable."""
    try:
        severity = SEVERITIES[int(priority)]
    except (TypeError, ValueError, IndexError):
        return ""
    try:
        return f"<{FACILITIES[int(facility)]}.{severity}>"
    except (TypeError, ValueError, IndexError):
        return f"<{severity}>"


def keep_outcomes(text: str) -> str:
    """`text` with its outcome-bearing numbers written as their class (see the module docstring).

    >>> keep_outcomes('GET /api HTTP/1.1" 502 173')
    'GET /api HTTP/1.1" <server-error> 173'
    >>> keep_outcomes("<11>1 2024-01-01T00:00:00Z web app - - job exited with code 137")
    '<user.err> 1 2024-01-01T00:00:00Z web app - - job exited with code <killed-by-SIGKILL>'
    """
    if "<" in text[:1]:
        match = _PRI.match(text)
        if match is not None and int(match["pri"]) < 8 * len(FACILITIES):
            pri, rest = int(match["pri"]), text[match.end():]
            # RFC 5424's VERSION follows the PRI without a space: a token `<user.err>1` would carry a digit
            text = priority_label(pri % 8, pri // 8) + (" " if rest[:1].strip() else "") + rest
    if any(c.isdigit() for c in text):
        text = _HTTP.sub(lambda m: f"{m['lead']}<{HTTP_CLASSES[int(m['code'][0])]}>", text)
        text = _EXIT.sub(lambda m: f"{m['lead']}<{exit_class(int(m['code']))}>", text)
    return text
