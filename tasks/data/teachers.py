"""Rationale teachers for the distill stage: each writes a CoT completion for a log, given its expert label.

- `LexiconTeacher` (offline default): an evidence-grounded rationale (issue 19) in the paper's three parts:
  domain knowledge (the component named as the log writes it, in backquotes, then the knowledge of the
  lexicon entry it matched, attributed to that entry), core information (the log's opening words and its
  deciding failure or success words, quoted), and a deduction mapped to a Table 1 category; for a log the
  experts call normal despite an error word, why it is benign from a source (an expert correction or review
  note, the BENIGN lexicon with each entry's source, else the experts' label itself); a shown neighbour with
  the same label cited with that label; ending "So the log is <label>.". Short on purpose (about 40-70
  words): the student is small and evaluation cost grows with every generated token.
- `OpenAITeacher`: any OpenAI-compatible chat endpoint (GPT-4o in the paper). Answers are cached on
  disk under the sha256 of the request (model, temperature, messages), so a rerun costs no request;
  transient failures are retried with exponential backoff by the client (`max_retries`).

Both return the full completion text (`<think>…</think><answer>…</answer>`); the distill stage
validates it with `tasks.prompt.parse_completion` and the rationale checks (tasks.evaluation.rationales) and
rejects and counts what does not fit.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tasks.common.errors import InputError
from tasks.common.files import sha256_bytes, write_text_atomic
from tasks.common.prompt import CATEGORIES, format_completion, label_name, sanitize_log, user_prompt
from tasks.common.settings import DistillSettings

SYSTEM_ERROR, NETWORK, HARDWARE, SOFTWARE = CATEGORIES


class Teacher(Protocol):
    """Writes a rationale for a (log, label, dataset) in the answer format: `completion` returns the text."""
    name: str
    concurrency: int

    def completion(self, log: str, label: int, dataset: str, neighbours: Sequence[tuple[str, int]] = ()) -> str:
        """The teacher's completion for one log whose expert label is `label` (1 = abnormal), shown with the
        labelled `neighbours` (template, 0/1) the explain example's prompt shows."""
        ...


@dataclass(frozen=True)
class Component:
    """What a log's source is, in one sentence, and the Table 1 category its failures usually fall in."""

    name: str
    pattern: re.Pattern[str]
    knowledge: str
    category: str


def _c(name: str, pattern: str, knowledge: str, category: str, flags: int = re.IGNORECASE) -> Component:
    return Component(name, re.compile(pattern, flags), knowledge, category)


# First match wins, so the specific entries come before the generic ones.
COMPONENTS: tuple[Component, ...] = (
    _c("register dump", r"^\s*(?:<\*>\s*)*(?:(?:fpr|r)\d+=|\d+:[0-9a-f]{8}\b|lr:[0-9a-f]|0x[0-9a-f]{8}\s+0x)",
       "after an interrupt the Blue Gene/L kernel dumps the PowerPC core's registers, a few per line",
       SOFTWARE),
    _c("ciod", r"\bciod\b", "ciod is the Blue Gene/L control and I/O daemon that loads jobs on I/O nodes and "
       "forwards their file and socket I/O", SOFTWARE),
    _c("idoproxy", r"idoproxy|\bIDo\b", "idoproxy relays service-node commands to the IDo chips that control "
       "node cards and link cards", SYSTEM_ERROR),
    _c("MMCS", r"mmcs|Midplane|bll_", "MMCS, the midplane management control system, boots partitions "
       "and drives the midplane switches", SYSTEM_ERROR),
    _c("control-system Java monitor", r"java\.|FanModule|\bmonitor\b", "the service node's Java monitors poll fans, "
       "power modules and node cards over the control network", SOFTWARE),
    _c("EDRAM", r"EDRAM", "EDRAM is the embedded DRAM that forms the L3 cache of each Blue Gene/L chip", HARDWARE),
    _c("DDR memory", r"\bDDR\b|\bECC\b|memory controller", "DDR is the node's main memory; ECC corrects single-bit "
       "errors and flags uncorrectable ones", HARDWARE),
    _c("disk storage", r"cciss|scsi|sense key|\bhd[a-z]\b|\bsd[a-z]?\d|I/O error|Input/output|\bdrives?\b|\bdisk"
       r"|MSA1000|CHECK CONDITION|smartd|\braid\b", "disks sit behind SCSI, IDE or Smart Array (cciss) controllers "
       "that report media and I/O errors", HARDWARE),
    _c("L3 cache", r"\bL[123]\b|(?:instruction|data|L[123]) cache|cache (?:parity|line|error)",
       "the processor caches (L1, L2, L3) are guarded by parity or ECC checks against bit flips", HARDWARE),
    _c("torus network", r"torus", "the 3D torus network carries point-to-point messages between compute nodes",
       NETWORK),
    _c("tree network", r"\btree\b|collective", "the collective tree network carries broadcasts, reductions and "
       "I/O traffic between nodes", NETWORK),
    _c("VPD", r"\bVPD\b", "vital product data (VPD) identifies each hardware part and is checked when cards start",
       HARDWARE),
    _c("node, link and power cards", r"node card|link card|service card|power module|power good|bulk power|\bfans?\b"
       r"|temperature|clock card|voltage", "node, link and service cards carry the chips, while power modules and "
       "fans keep them within limits", HARDWARE),
    _c("rts kernel runtime", r"\brts\b|kernel terminated", "rts is the compute-node kernel runtime that starts jobs "
       "and exchanges messages with the I/O node", SYSTEM_ERROR),
    _c("PowerPC core", r"machine check|interrupt|exception syndrome|alignment exception|\bTLB\b|divide-by-zero|"
       r"invalid operation|floating point", "the PowerPC core raises machine checks and storage or program "
       "interrupts when an instruction or memory access goes wrong", HARDWARE),
    _c("HP server management agents", r"hpasmd|\bcma\w*|Advanced Server Management|Log Daemon|\bNMI\b",
       "HP management agents (hpasmd, cma*) watch server hardware and array controllers and raise alerts", HARDWARE),
    _c("ext3 file system", r"ext[23]|journal|superblock|inode|readonly fs", "ext2/ext3 is the local journaling file "
       "system; the kernel logs its mounts, journal state and recovery", SYSTEM_ERROR),
    _c("Lustre", r"lustre|ptlrpc|portals|gmnal|\bLNET\b", "Lustre is the parallel file system that nodes mount over "
       "the interconnect through its ptlrpc layer", NETWORK),
    _c("NFS", r"\bnfs\w*", "NFS exports shared file systems from servers to the cluster nodes over the network",
       NETWORK),
    _c("RPC", r"\bRPC\b|portmap|mountd|callit", "Sun RPC carries remote calls such as NFS mount requests between "
       "clients and servers", NETWORK),
    _c("mount", r"\bmount", "mount attaches file systems to the directory tree, often NFS or Lustre exports from a "
       "server", NETWORK),
    _c("GM/Myrinet", r"\bGM\b|\bgm_|myrinet|\bMCP\b", "GM is the Myrinet driver and messaging layer whose MCP "
       "firmware runs on the network card", NETWORK),
    _c("InfiniBand", r"\bib_|infiniband|mthca|\bIB\b|ipoib|openib", "InfiniBand is the high-speed interconnect "
       "between nodes, driven by the mthca/ib modules", NETWORK),
    _c("PBS", r"pbs|TMom|qsub|Scheduler|im_eof|node_bailout|task_check|scan_for_exiting|epilog|prolog|\bjob\b",
       "PBS schedules batch jobs; pbs_mom on each node starts, tracks and cleans up job tasks", SOFTWARE),
    _c("mail system", r"postfix|postqueue|postdrop|postsuper|sendmail|relay=|status=(?:sent|deferred|bounced)|"
       r"/etc/mail|\bMX\b|smtp|port 25|"
       r"from=<", "postfix and sendmail queue and relay system mail and log every delivery attempt", NETWORK),
    _c("authentication services", r"sshd|ssh2|password|authenticat|\bPAM\b|pam_|login|kerberos|\bsudo\b|TTY=|passwd|"
       r"\buser\b|\buid\b", "sshd, PAM and sudo authenticate users and record each login or privileged command",
       SYSTEM_ERROR),
    _c("DHCP", r"dhcp|leases?\b", "dhcpd hands out IP addresses to nodes that boot or renew their leases", NETWORK),
    _c("NTP", r"ntpd|synchroni[sz]|time server|\bstratum\b", "ntpd keeps node clocks synchronised with the cluster "
       "time servers", SYSTEM_ERROR),
    _c("cron", r"cron|\bCMD\b", "crond runs scheduled maintenance commands on each node", SYSTEM_ERROR),
    _c("Ganglia", r"gmond|gmetad|ganglia|RRD", "Ganglia (gmond, gmetad) collects node metrics into RRD files",
       SOFTWARE),
    _c("Nagios", r"nagios|SERVICE ALERT|HOST ALERT|plugin", "Nagios runs check plugins against hosts and services "
       "and raises alerts", SYSTEM_ERROR),
    _c("Samba", r"samba|nmbd|smbd|master browser|workgroup", "Samba's nmbd and smbd provide Windows file sharing and "
       "browse-master elections", NETWORK),
    _c("network interface", r"ethernet|\beth\d|\bNIC\b|link is|\bbond\d?\b|\bnetwork\b|\bTCP\b|\bIP\b",
       "the node's Ethernet interfaces, possibly bonded, connect it to the cluster networks", NETWORK),
    _c("network service", r"xinetd|listening on|bind to port|already in use|listener|\bport\b|connect(?:ion)?\b",
       "network daemons listen on ports and hold connections with clients and servers", NETWORK),
    _c("init", r"\binit\b|respawn|runlevel|shutdown|shutting down|halted|reboot", "init starts and respawns system "
       "services and drives shutdown and reboot", SYSTEM_ERROR),
    _c("logging daemon", r"syslog|klogd|log daemon|audit", "syslogd and klogd collect kernel and service messages "
       "into the system log", SYSTEM_ERROR),
    _c("kernel boot messages", r"ACPI|APIC|\bIRQ|\bPCI\b|pci|BIOS|Bootdata|command line|Memory:|RAM|totalpages|\bCPU\d|"
       r"Intel|agpgart|usb|ehci|serial|NET4|zone|pages|highmem|lowmem|hash table|Calibrat|console|VGA|Copyright|"
       r"rights reserved|version|driver|\bv\d", "at boot the Linux kernel reports the CPUs, memory, interrupts, buses "
       "and drivers it finds", SYSTEM_ERROR),
    _c("process control", r"segfault|segmentation|signal|killed|panic|oops|out of memory|allocate memory|assert"
       r"|abort|core dump", "the kernel manages processes and memory and reports crashes, kills and exhaustion",
       SOFTWARE),
    _c("user application", r"\bAPP\b|application|program|exited|exit code|image", "user applications run on the "
       "compute nodes and report how they start and end", SOFTWARE),
    _c("HDFS DataNode", r"\bblock\b|blk_|DataNode|PacketResponder|Receiving|Received", "HDFS DataNodes store file "
       "blocks, replicate them in pipelines and report each block to the NameNode", SYSTEM_ERROR),
    _c("HDFS NameNode", r"NameSystem|NameNode|blockMap|addStoredBlock|allocateBlock", "the HDFS NameNode keeps the "
       "block map and decides where each block is stored", SYSTEM_ERROR),
)

DATASET_COMPONENTS: dict[str, Component] = {
    "bgl": _c("RAS event stream", r".", "Blue Gene/L's RAS system records kernel, hardware and control-system "
              "events from every node and card", SYSTEM_ERROR),
    "spirit": _c("syslog", r".", "Spirit is a Linux cluster whose nodes send kernel and daemon messages to syslog",
                 SYSTEM_ERROR),
    "thunderbird": _c("syslog", r".", "Thunderbird is a Linux cluster whose nodes send kernel and daemon messages "
                      "to syslog", SYSTEM_ERROR),
    "hdfs": _c("HDFS", r".", "HDFS stores file blocks on DataNodes under the NameNode's control and logs each "
               "block's life", SYSTEM_ERROR),
}
DEFAULT_COMPONENT = _c("system service", r".", "system services on cluster nodes log their state changes and "
                       "problems", SYSTEM_ERROR)

CATEGORY_WORDS: dict[str, re.Pattern[str]] = {
    HARDWARE: re.compile(r"parity|\becc\b|machine check|uncorrectable|hardware|sram|\bddr\b|edram|power|\bfans?\b|"
                         r"temperature|voltage|sense key|\bnmi\b|\bchip\b|\bdrive\b|not ready|media", re.I),
    NETWORK: re.compile(r"time[d ]?out|connect|refused|unreachable|no route|\blink\b|network|socket|host not found|"
                        r"disconnect|reset by peer|\brpc\b|\bnfs\b|packet|broken pipe", re.I),
    SOFTWARE: re.compile(r"exception|segmentation|signal|assert|abort|core dump|null|invalid|killed|panic|illegal|"
                         r"divide|alignment|\bjob\b|program|plugin|conversion", re.I),
}
# The keyword list (one owner): the words operators grep for, matched case-insensitively at word starts (so
# "fail" matches "failed", "err" matches "error"). Used by the keyword baseline (tasks.evaluation.baselines),
# by the false "no failure word" check (tasks.evaluation.rationales) and by the teachers, which never claim a
# log holds no failure word when it holds one of these. Chosen from operators' practice, not tuned on test data.
FAILURE_WORDS: tuple[str, ...] = (
    "abort", "alert", "cannot", "can't", "corrupt", "crash", "critical", "denied", "died", "down",
    "err", "exception", "fail", "fatal", "fault", "halt", "illegal", "invalid", "kill", "lost",
    "panic", "refused", "severe", "timed out", "timeout", "unable", "unavailable", "unreachable",
    "violation", "warn",
)
_KEYWORD_RE = re.compile(r"(?<![A-Za-z])(" + "|".join(re.escape(w) for w in FAILURE_WORDS) + ")", re.IGNORECASE)
_KEYWORD_WORD_RE = re.compile(_KEYWORD_RE.pattern + r"[\w']*", re.IGNORECASE)


def keyword_hits(template: str) -> list[str]:
    """The keywords of FAILURE_WORDS found in a template (lower-cased, as listed), in order."""
    return [m.group(1).lower() for m in _KEYWORD_RE.finditer(template or "")]


def keyword_words(log: str) -> list[str]:
    """The log's own words holding a keyword, widened to the whole word as written (`failed`, `ERROR`), in order."""
    return [m.group(0) for m in _KEYWORD_WORD_RE.finditer(log or "")]


# Wider cue words a teacher may quote as deciding a case (the keyword list's words and these): conditions the
# keyword list misses, e.g. `Temperature Over Limit`, `parity`, `deferred`.
CUE_WORDS = re.compile(
    r"\b(?:errors?|failed|failure|fail|fatal|time[d ]?out|parity|uncorrectable|panic|exception|abort(?:ed)?|killed|"
    r"refused|unreachable|lost|corrupt\w*|denied|invalid|cannot|can't|unable|bad|down|critical|severe|warning|"
    r"not ready|not found|no such|illegal|missing|mismatch|severed|reset|broken|halted|disabled|deferred|overflow|"
    r"exceeded|over limit|assert\w*|trouble|leaked|premature|spoof|attack)\b", re.I)
SUCCESS_WORDS = re.compile(r"\b(?:succeeded|success\w*|ok|good|started|starting|completed?|accepted|sent|registered|"
                           r"enabled|initiali[sz]ed|mounted|ready|running|installed|supported|detected|found)\b", re.I)
RECOVERED_WORDS = re.compile(r"\b(?:corrected|recovered|retry(?:ing)?|restarted|resumed|cleared|suppressing)\b", re.I)


def find_component(log: str, dataset: str) -> Component:
    """The first lexicon entry whose pattern occurs in the log, else the dataset's own stream."""
    for component in COMPONENTS:
        if component.pattern.search(log):
            return component
    return DATASET_COMPONENTS.get(dataset.lower(), DEFAULT_COMPONENT)


def find_category(log: str, component: Component) -> str:
    """The Table 1 category whose cue words the log uses most; the component's usual one on a tie or none."""
    hits = {category: len(pattern.findall(log)) for category, pattern in CATEGORY_WORDS.items()}
    best = max(hits.values())
    if best == 0:
        return component.category
    tied = [category for category, n in hits.items() if n == best]
    return component.category if component.category in tied else tied[0]


def _unique(words: list[str], limit: int) -> list[str]:
    seen: list[str] = []
    for word in words:
        if word.lower() not in (s.lower() for s in seen):
            seen.append(word)
    return seen[:limit]


def _quote(items: list[str]) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def snippet(log: str, max_words: int = 10, max_chars: int = 90) -> str:
    """The log's opening words, quoted into the rationale (tags defanged, length capped)."""
    words = sanitize_log(log, 4 * max_chars).split()
    text = " ".join(words[:max_words])
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
    return text + (" …" if text != " ".join(words) else "")


@dataclass(frozen=True)
class Benign:
    """Why an error-worded log can be normal: the pattern it shows, the reason, and where the reason is stated."""

    pattern: re.Pattern[str]
    reason: str
    source: str


def _b(pattern: str, reason: str, source: str) -> Benign:
    return Benign(re.compile(pattern, re.IGNORECASE), reason, source)


# Benign readings of error words, each from a named source (a man page, an RFC, a standard, or the log's own
# words); only entries whose reason the source states. Used for logs the experts label normal (issue 19).
BENIGN: tuple[Benign, ...] = (
    _b(r"\.{2,}\s*0\s*$", "the counter reads 0, so none occurred", "the log's own value"),
    _b(r"\bno \w+ (?:are|is) active", "the status says none of them is active", "the log's own words"),
    _b(r"\bcorrected\b", "a corrected error was repaired by the error-correcting code and the data stayed intact",
       "Linux kernel EDAC documentation: corrected (CE) versus uncorrected (UE) errors"),
    _b(r"status=deferred", "postfix keeps a deferred message in its queue and retries the delivery later",
       "Postfix OVERVIEW, the deferred queue"),
    _b(r"stat=Deferred", "sendmail keeps a deferred message in its queue and retries it at a later queue run",
       "sendmail(8)"),
    _b(r"running e2fsck is recommended|maximal mount count", "the kernel mounted the file system and only advises "
       "a later check", "e2fsck(8), tune2fs(8)"),
    _b(r"mounting ext3 filesystem as ext2", "an ext3 file system can be mounted as ext2, without its journal",
       "Linux ext3 documentation"),
    _b(r"Received TERM|\bSIGTERM\b", "TERM is the signal that asks a process to end, so it stopped on request",
       "signal(7)"),
    # login contexts only: `chown: ... invalid user` is no login (an unknown user name given to chown)
    _b(r"Failed password|authentication failure|FAILED LOGIN|Password authentication for user .* failed|"
       r"(?:Invalid|illegal) user \S+ from", "the authentication service refused the credentials and recorded the "
       "attempt, as it is built to do", "sshd(8), pam(8)"),
    _b(r"\bLIP reset", "a loop initialisation (LIP) re-establishes the Fibre Channel loop when a device joins or "
       "resets", "Fibre Channel Arbitrated Loop standard (FC-AL)"),
    _b(r"time reset [+-]?\d", "ntpd steps the clock when its offset exceeds the 128 ms step threshold", "ntpd(8)"),
    _b(r"\bDHCPNAK\b", "a DHCPNAK tells a client its requested address is wrong for its network and the client "
       "starts over", "RFC 2131, section 3.1"),
    _b(r"\bSIMULAT", "the log says the event is simulated, a deliberate test", "the log's own words"),
    _b(r"\busage:", "a usage line is a command's reply to wrong arguments: it printed its syntax",
       "the log's own words"),
    _b(r"\bfailed\b.*:\s*OK\b", "the log ends in OK: the operation succeeded on retry", "the log's own words"),
)


def benign_reason(log: str) -> Benign | None:
    """The first BENIGN entry whose pattern occurs in the log, else None."""
    return next((entry for entry in BENIGN if entry.pattern.search(log)), None)


_TOKEN_CHARS = re.compile(r"[\w.\-]")
_PROGRAM = re.compile(r"^\s*(?:<\*>\s*|>+\s*)*([A-Za-z][\w.\-]*[A-Za-z0-9])(?:\[[^\]]*\]|\(\d*\))?:")
_WORD = re.compile(r"[A-Za-z][\w.\-]*[A-Za-z0-9]")
_STOP = frozenset(("the", "a", "an", "is", "are", "was", "were", "be", "been", "has", "have", "had", "not", "no",
                   "of", "on", "in", "at", "to", "for", "from", "with", "by", "and", "or", "as", "this", "that",
                   "it", "its", "fully", "all", "any", "some"))


def component_token(log: str, component: Component) -> str:
    """The component as written in the log: the whole word (letters, digits, `_.-`) around the first word
    character the lexicon entry's pattern matched (`MidplaneSwitchController` for the MMCS entry's `Midplane`);
    for a log no specific entry matches, its syslog-style `program:` prefix, else its first word that is neither
    a function word nor a keyword."""
    match = None if component.pattern.pattern == "." else component.pattern.search(log)
    start = next((i for i in range(match.start(), match.end()) if log[i].isalnum()), None) if match else None
    if start is not None:
        end = start
        while start > 0 and _TOKEN_CHARS.match(log[start - 1]):
            start -= 1
        while end < len(log) and _TOKEN_CHARS.match(log[end]):
            end += 1
        token = log[start:end].strip("._-")
        if token:
            return token[:60]
    program = _PROGRAM.match(log)  # a syslog-style `program:` or `program[pid]:` prefix
    if program and not keyword_hits(program.group(1)):
        return program.group(1)[:60]
    words = [w for w in _WORD.findall(log) if w.lower() not in _STOP and not keyword_hits(w)]
    return (words or _WORD.findall(log) or log.split() or ["log"])[0][:60]


def _fragment(text: str, max_words: int, max_chars: int = 70) -> str:
    """The opening words of `text` to quote: cut before any double quote, capped, with an ellipsis when cut."""
    clean = snippet(text.split('"')[0], max_words=max_words, max_chars=max_chars)
    return clean if clean.strip(" …") else ""


def failure_words(log: str) -> list[str]:
    """The log's words that may decide the case, as written: keyword-list words first, then other cue words."""
    return _unique([*keyword_words(log), *CUE_WORDS.findall(log)], 3)


def _cite(neighbours: Sequence[tuple[str, int]], label: int) -> str:
    """A sentence citing the first shown neighbour with the same label, or '' when none is shown."""
    for template, neighbour_label in neighbours:
        if int(neighbour_label) == label and (quoted := _fragment(template, 6, 50)):
            return f' An expert labelled the similar log "{quoted}" {label_name(label)}.'
    return ""


def lexicon_rationale(log: str, label: int, dataset: str, neighbours: Sequence[tuple[str, int]] = (),
                      note: str | None = None, normal_basis: str = "the experts label this message normal") -> str:
    """Domain knowledge, core information and deduction for one log, ending in its label (issue 19): the
    component named as written in the log (`backquoted`), the lexicon's knowledge attributed to its entry, the
    log's deciding words quoted, for an error-worded normal log the benign reason with its source (`note`: an
    expert correction or review note, else BENIGN, else the experts' label itself), and a shown neighbour with
    the same label cited with it. Never claims the log holds no failure word. `normal_basis` is the reason given for
    an error-worded normal log with no note, benign entry or recovery word: the experts' label when teaching, the
    version's score when serving (tasks.evaluation.rationales.grounded_rationale), where no expert saw the log."""
    component = find_component(log, dataset)
    token = component_token(log, component)
    category = find_category(log, component)
    failures = failure_words(log)
    successes = _unique(SUCCESS_WORDS.findall(log), 2)
    recovered = _unique(RECOVERED_WORDS.findall(log), 1)
    dump = component.name == "register dump"  # hex words cost many tokens: quote less of a dump
    quoted = _fragment(log, 2 if dump else 7, 60)
    core = f'the log reads "{quoted}"' if quoted else "the log"
    if failures:
        core += f", with {_quote(failures)}"
    elif successes:
        core += f", with {_quote(successes)}"
    where = f"`{token}`"
    if label == 1:
        if failures:
            deduction = f"{_quote(failures[:2])} {'signal' if len(failures) > 1 else 'signals'} a {category}"
        else:
            deduction = f"this event marks a {category}"
        if note:
            deduction += f"; {note}"
    elif dump:
        deduction = "a register dump is context printed around another event, not a failure by itself"
    elif failures:
        benign = benign_reason(log)
        if note:
            why = note
        elif benign is not None:
            why = f"{benign.reason} (source: {benign.source})"
        elif recovered:
            why = f"it says {_quote(recovered)}, so the condition was handled"
        else:
            why = normal_basis
        deduction = f"although it says {_quote(failures[:1])}, {why}"
    elif successes:
        deduction = f"it records a routine, successful step of {where}, with no sign of a {category}"
    else:
        deduction = f"it is routine status output of {where}, with no sign of a {category}"
    return (f"Domain knowledge: the log names {where}; lexicon ({component.name}): {component.knowledge}. "
            f"Core information: {core}. Deduction: {deduction}.{_cite(neighbours, label)} "
            f"So the log is {label_name(label)}.")


def expert_notes(corrected_file: Path | None, resolution_file: Path | None = None) -> dict[str, str]:
    """template → what the experts decided about it, for the teachers' deduction: a label the `correct` stage
    changed (data/corrected/templates.parquet, columns template, label_original, label, correction) and the
    review notes of a resolved multi-annotator review (the resolution file's `notes`, from the review CSVs'
    `note` column). Quote characters are dropped from notes (a note is no quote of the log). Missing files: {}."""
    import pandas as pd

    notes: dict[str, str] = {}
    if corrected_file is not None and Path(corrected_file).exists():
        frame = pd.read_parquet(corrected_file)
        if {"template", "label_original", "label", "correction"} <= set(frame.columns):
            changed = frame[frame["label_original"].astype(int) != frame["label"].astype(int)]
            for template, before, after, how in zip(changed["template"], changed["label_original"],
                                                    changed["label"], changed["correction"], strict=True):
                where = "a review" if how == "review" else "the expert patch"
                notes[str(template)] = (f"the experts corrected its label from {label_name(int(before))} to "
                                        f"{label_name(int(after))} ({where})")
    if resolution_file is not None and Path(resolution_file).exists():
        records = json.loads(Path(resolution_file).read_text(encoding="utf-8"))
        for record in records if isinstance(records, list) else []:
            said = [re.sub(r"[\"'`]", "", str(n)) for n in record.get("notes") or []]
            if said and record.get("input"):
                template = str(record["input"]).strip()
                notes[template] = (notes.get(template, "the reviewers labelled it " + str(record.get("rectified")))
                                   + "; a reviewer notes " + "; ".join(said)[:160])
    return notes


class LexiconTeacher:
    """Offline, deterministic teacher: grounded rationales from the component lexicon, the benign lexicon and the
    experts' notes (`notes`: template → sentence, from `expert_notes`)."""

    name = "lexicon"
    concurrency = 1

    def __init__(self, notes: Mapping[str, str] | None = None) -> None:
        self.notes = dict(notes or {})

    def completion(self, log: str, label: int, dataset: str, neighbours: Sequence[tuple[str, int]] = ()) -> str:
        """The grounded lexicon rationale and the label as a completion (deterministic, offline)."""
        note = self.notes.get(log.strip())
        return format_completion(lexicon_rationale(log, label, dataset, neighbours, note), label)


TEACHER_SYSTEM = (
    "You explain expert labels of system log templates. Categories of anomalies (the RationAnomaly paper, Table 1): "
    + ", ".join(CATEGORIES) + ". Write a short rationale of 40 to 70 words in three parts: 'Domain knowledge:' the "
    "component as the log writes it, in backquotes (`like_this`), and what it does; 'Core information:' the log's "
    "own words that decide the case, quoted exactly in double quotes; 'Deduction:' the reasoning (for an abnormal "
    "log its category; for an error-worded normal log why the error word is benign). When a labelled similar log "
    "shown above bears on the label, cite it as: An expert labelled the similar log \"...\" normal|abnormal. Never "
    "say the log has no failure or error word when it has one, and state no fact the log, the similar logs or "
    "common documentation do not support. End with: So the log is normal|abnormal. "
    "Reply exactly as <think>rationale</think><answer>normal or abnormal</answer> and nothing else."
)


class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint, with an on-disk answer cache keyed by the request's sha256."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str, cache_dir: str | Path, *, max_retries: int,
                 timeout_s: float, temperature: float, concurrency: int, max_log_chars: int) -> None:
        from openai import OpenAI

        key = os.environ.get(api_key_env, "")
        if not key:
            raise InputError("params.yaml", f"environment variable {api_key_env} (the API key) is not set",
                             field="distill.openai.api_key_env", hint="export it, or use teacher: lexicon")
        self.model, self.temperature, self.max_log_chars = model, float(temperature), int(max_log_chars)
        self.concurrency = max(1, int(concurrency))
        self.cache_dir = Path(cache_dir)
        self.client = OpenAI(base_url=base_url, api_key=key, max_retries=int(max_retries), timeout=float(timeout_s))
        self.requests = self.cache_hits = 0
        self._lock = threading.Lock()

    def messages(self, log: str, label: int, dataset: str,
                 neighbours: Sequence[tuple[str, int]] = ()) -> list[dict[str, str]]:
        """The teacher sees the log with the labelled neighbours the explain example shows, and the expert's label,
        and rationalises that label (as in the paper)."""
        user = (user_prompt(log, dataset, self.max_log_chars, neighbours=list(neighbours))
                + f"\n\nThe expert label is: {label_name(label)}. Explain it.")
        return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": user}]

    def cache_key(self, messages: list[dict[str, str]]) -> str:
        """sha256 of the request (model, messages, temperature): the on-disk cache key."""
        request = {"model": self.model, "temperature": self.temperature, "messages": messages}
        return sha256_bytes(json.dumps(request, sort_keys=True, ensure_ascii=False).encode())

    def completion(self, log: str, label: int, dataset: str, neighbours: Sequence[tuple[str, int]] = ()) -> str:
        """The endpoint's completion for one log, from the cache when asked before; raises after the retries. The
        distill stage checks it like any teacher's (tasks.evaluation.rationales.check_rationale)."""
        messages = self.messages(log, label, dataset, neighbours)
        path = self.cache_dir / f"{self.cache_key(messages)}.json"
        if path.exists():
            with self._lock:
                self.cache_hits += 1
            return str(json.loads(path.read_text(encoding="utf-8"))["completion"])
        response = self.client.chat.completions.create(model=self.model, messages=messages,  # type: ignore[arg-type]
                                                       temperature=self.temperature)
        text = response.choices[0].message.content or ""
        with self._lock:
            self.requests += 1
        write_text_atomic(path, json.dumps({"model": self.model, "messages": messages, "completion": text},
                                           ensure_ascii=False) + "\n")
        return text

    def stats(self) -> dict[str, Any]:
        """Requests sent and cache hits so far (for the distill report)."""
        return {"model": self.model, "requests": self.requests, "cache_hits": self.cache_hits}


def make_teacher(settings: DistillSettings, root: Path, notes: Mapping[str, str] | None = None) -> Teacher:
    """The teacher named by `distill.teacher` (the lexicon teacher with the experts' `notes`, see `expert_notes`);
    raises InputError (before any request) when the openai teacher's API key is not set."""
    if settings.teacher == "lexicon":
        return LexiconTeacher(notes)
    opts = settings.openai.model_dump()
    cache_dir = Path(opts.pop("cache_dir"))
    return OpenAITeacher(cache_dir=cache_dir if cache_dir.is_absolute() else root / cache_dir,
                         max_log_chars=settings.max_log_chars, **opts)
