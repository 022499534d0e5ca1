"""
The report card, nanochat style. Every stage of the pipeline appends one markdown section file to
$NANOCHAT_BASE_DIR/report/ as it finishes (`get_report().log(section=..., data=[...])`);
`generate()` stitches them into report/report.md in a fixed pipeline order, headed by the
environment (git commit, date, platform, CPU/GPU, torch) and followed by a summary table of the key
metrics and the timings. Sections are separate files so that a crashed or resumed run keeps what
it already wrote, and so that re-running one stage simply overwrites its own section.

CLI:  python -m nanochat.report reset      # start a new report (clears old sections, writes the header)
      python -m nanochat.report generate   # assemble report/report.md
"""
import argparse
import datetime
import os
import platform
import re
import shutil
import socket
import subprocess
import sys

from nanochat.common import get_base_dir

# Pipeline order of the sections. A stage logs under one of these titles; anything else that was
# logged still appears, after these, in alphabetical order (so nothing is ever silently dropped).
SECTION_ORDER = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Midtraining",
    "Chat evaluation mid",
    "Chat SFT",
    "Chat evaluation sft",
    "MegaContext evaluation",
    "MegaContext benchmark",
]

# Summary table: which sections feed which column. Every numeric "- key: value" bullet of an
# evaluation section becomes a row (a metric), so the table follows whatever the eval scripts log;
# training sections (full of settings) only contribute their loss / bpb bullets.
SUMMARY_COLUMNS = {
    "BASE": ["Base model training", "Base model loss", "Base model evaluation"],
    "MID": ["Midtraining", "Chat evaluation mid"],
    "SFT": ["Chat SFT", "Chat evaluation sft"],
    "MC": ["MegaContext evaluation"],
}
TRAINING_SECTIONS = {"Base model training", "Midtraining", "Chat SFT"}
# Keys that are settings or bookkeeping, not metrics (never put in the summary table).
_NOT_METRIC_WORDS = {"step", "steps", "seed", "batch", "depth", "iterations", "num", "tokens", "params",
                     "parameters", "lr", "samples", "time", "device", "dtype", "world", "size", "len",
                     "length", "every", "source", "tag", "flops", "mfu"}


def is_metric_key(key):
    """Bookkeeping keys (steps, sizes, learning rates, timings...) are not summary metrics."""
    return not (set(re.split(r"[^a-z0-9]+", key.lower())) & _NOT_METRIC_WORDS)

HEADER_FILE = "header.md"
REPORT_FILE = "report.md"


def slugify(text):
    """'Chat evaluation sft' -> 'chat-evaluation-sft' (the section's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _now():
    return datetime.datetime.now()


def _fmt_time(t):
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _run(cmd):
    """Output of a small command, or None if it is unavailable (no git, not a checkout...)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def get_git_info():
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown"
    status = _run(["git", "status", "--porcelain"])
    dirty = bool(status) if status is not None else None
    message = _run(["git", "log", "-1", "--format=%s"]) or ""
    return {"commit": commit, "branch": branch, "dirty": dirty, "message": message[:80]}


def git_commit():
    """The checkout's commit ('+dirty' when it has uncommitted changes): a README table cites the code it measured."""
    git = get_git_info()
    return git["commit"] + ("+dirty" if git.get("dirty") else "")


def get_gpu_info():
    try:
        import torch
    except ImportError:
        return {"available": False}
    if not torch.cuda.is_available():
        return {"available": False}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mem = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(len(names))]
    return {"available": True, "count": len(names), "names": names, "memory_gb": mem,
            "cuda_version": torch.version.cuda}


def get_system_info():
    import torch
    info = {
        "hostname": socket.gethostname(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:  # total RAM on Linux; other platforms just skip it
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = pages * page_size / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return info


def get_bloat_info():
    """Lines and characters of code in the repo: nanochat keeps itself honest about its size."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files, lines, chars = 0, 0, 0
    for pkg in ("nanochat", "megacontext", "scripts", "tasks"):
        for dirpath, _, names in os.walk(os.path.join(root, pkg)):
            for name in names:
                if name.endswith((".py", ".html", ".sh")):
                    with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                        text = f.read()
                    files, lines, chars = files + 1, lines + text.count("\n"), chars + len(text)
    return {"files": files, "lines": lines, "characters": chars}


def format_value(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def markdown_table(headers, rows):
    """A markdown table; cells are formatted with format_value. Handy for eval scripts' sections."""
    out = ["| " + " | ".join(str(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        out.append("| " + " | ".join(format_value(c) for c in row) + " |")
    return "\n".join(out) + "\n"


def render_section(section, data, timestamp):
    """Markdown for one section: a dict becomes '- key: value' bullets, a string is kept verbatim."""
    lines = [f"## {section}", f"timestamp: {_fmt_time(timestamp)}", ""]
    for item in data:
        if item is None:
            continue
        if isinstance(item, dict):
            for k, v in item.items():
                lines.append(f"- {k}: {format_value(v)}")
        else:
            lines.append(str(item).rstrip("\n"))
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n\n"


def parse_section(text):
    """(title, timestamp or None, {key: value-string}) back from a section file's markdown."""
    m = re.search(r"^## (.+)$", text, re.M)
    title = m.group(1).strip() if m else None
    m = re.search(r"^timestamp: (.+)$", text, re.M)
    ts = None
    if m:
        try:
            ts = datetime.datetime.strptime(m.group(1).strip(), "%Y-%m-%d %H:%M:%S")
        except ValueError:
            ts = None
    metrics = {}
    for k, v in re.findall(r"^- ([^:\n]+): (.*)$", text, re.M):
        metrics[k.strip()] = v.strip()
    return title, ts, metrics


def _as_number(s):
    try:
        return float(s.replace(",", "").rstrip("%"))
    except (ValueError, AttributeError):
        return None


def _fmt_duration(seconds):
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Report:
    """Writes sections into `report_dir` and assembles them into report.md."""

    def __init__(self, report_dir):
        self.report_dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def section_path(self, section):
        return os.path.join(self.report_dir, slugify(section) + ".md")

    def log(self, section, data):
        """Write (or overwrite) one section. data: a list of dicts (metrics/settings) and strings (markdown)."""
        if isinstance(data, (dict, str)):
            data = [data]
        path = self.section_path(section)
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_section(section, data, _now()))
        return path

    def reset(self):
        """Start a new report: remove old sections and report.md, record the environment and start time."""
        for name in os.listdir(self.report_dir):
            if name.endswith(".md"):
                os.remove(os.path.join(self.report_dir, name))
        with open(os.path.join(self.report_dir, HEADER_FILE), "w", encoding="utf-8") as f:
            f.write(self._header_markdown(_now()))
        return os.path.join(self.report_dir, HEADER_FILE)

    def _header_markdown(self, start):
        """The environment block; `start` (None = unknown) is when the run began, for total timings."""
        started = _fmt_time(start) if start else "unknown"
        git, sysinfo, gpu, bloat = get_git_info(), get_system_info(), get_gpu_info(), get_bloat_info()
        lines = ["# nanochat + MegaContext training report", "",
                 f"Generated: {_fmt_time(_now())}", f"run started: {started}", "",
                 "## Environment", "",
                 "### Git",
                 f"- Branch: {git['branch']}",
                 f"- Commit: {git['commit']}" + (" (dirty)" if git["dirty"] else " (clean)" if git["dirty"] is False else ""),
                 f"- Message: {git['message']}", "",
                 "### Hardware",
                 f"- Platform: {sysinfo['platform']}",
                 f"- CPUs: {sysinfo['cpu_count']} ({sysinfo['cpu']})"]
        if "memory_gb" in sysinfo:
            lines.append(f"- Memory: {sysinfo['memory_gb']:.1f} GB")
        if gpu["available"]:
            names = ", ".join(sorted(set(gpu["names"])))
            lines += [f"- GPUs: {gpu['count']}x {names}", f"- GPU memory: {sum(gpu['memory_gb']):.1f} GB total",
                      f"- CUDA: {gpu['cuda_version']}"]
        else:
            lines.append("- GPUs: none")
        lines += ["", "### Software", f"- Python: {sysinfo['python']}", f"- PyTorch: {sysinfo['torch']}", "",
                  "### Bloat", f"- Files: {bloat['files']}", f"- Lines: {bloat['lines']:,}",
                  f"- Characters: {bloat['characters']:,}", ""]
        return "\n".join(lines) + "\n"

    def _sections(self):
        """{title: (text, timestamp)} of every section file present."""
        found = {}
        for name in os.listdir(self.report_dir):
            if not name.endswith(".md") or name in (HEADER_FILE, REPORT_FILE):
                continue
            with open(os.path.join(self.report_dir, name), encoding="utf-8") as f:
                text = f.read()
            title, ts, _ = parse_section(text)
            found[title or name[:-3]] = (text, ts)
        return found

    def generate(self):
        """Assemble report.md: header, sections in pipeline order, summary table, timings. Returns its path."""
        header_path = os.path.join(self.report_dir, HEADER_FILE)
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
        else:  # nobody ran `reset`: describe the environment now, with no known start time
            header = self._header_markdown(None)
        m = re.search(r"^run started: (.+)$", header, re.M)
        try:
            start = datetime.datetime.strptime(m.group(1).strip(), "%Y-%m-%d %H:%M:%S") if m else None
        except ValueError:  # "unknown"
            start = None
        header = re.sub(r"^Generated: .*$", f"Generated: {_fmt_time(_now())}", header, count=1, flags=re.M)

        sections = self._sections()
        ordered = [s for s in SECTION_ORDER if s in sections]
        ordered += sorted(s for s in sections if s not in SECTION_ORDER)
        parts = [header.rstrip("\n") + "\n\n"]
        for title in ordered:
            parts.append(sections[title][0].rstrip("\n") + "\n\n")
        parts.append(self._summary_markdown(sections, start))
        path = os.path.join(self.report_dir, REPORT_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(parts))
        return path

    def _summary_markdown(self, sections, start):
        lines = ["## Summary", ""]
        # metrics table: rows = metric names in first-seen order, columns = stages
        columns = {col: {} for col in SUMMARY_COLUMNS}
        row_names = []
        for col, srcs in SUMMARY_COLUMNS.items():
            for src in srcs:
                if src not in sections:
                    continue
                _, _, metrics = parse_section(sections[src][0])
                for k, v in metrics.items():
                    if _as_number(v) is None or not is_metric_key(k):
                        continue
                    if src in TRAINING_SECTIONS and not re.search(r"\b(bpb|loss)\b", k.lower()):
                        continue
                    columns[col][k] = v
                    if k not in row_names:
                        row_names.append(k)
        if row_names:
            used = [c for c in SUMMARY_COLUMNS if columns[c]]
            rows = [[k] + [columns[c].get(k, "-") for c in used] for k in row_names]
            lines.append(markdown_table(["Metric"] + used, rows))
        else:
            lines.append("(no evaluation metrics logged yet)\n")
        # timings: a stage's duration is the time since the previous event (report reset or section)
        timed = sorted((ts, title) for title, (_, ts) in sections.items() if ts is not None)
        if timed:
            rows, prev = [], start
            for ts, title in timed:
                rows.append([title, _fmt_time(ts), _fmt_duration((ts - prev).total_seconds()) if prev else "-"])
                prev = ts
            lines.append(markdown_table(["Stage", "Finished", "Duration"], rows))
            if start is not None:
                lines.append(f"Total wall clock time: {_fmt_duration((timed[-1][0] - start).total_seconds())}\n")
            else:
                lines.append("Total wall clock time: unknown (run `python -m nanochat.report reset` at the start)\n")
        return "\n".join(lines).rstrip("\n") + "\n"


class DummyReport:
    """Non-master ranks log nothing (only rank 0 writes the report)."""

    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report():
    """The report for this process: a real one on rank 0, a no-op elsewhere."""
    if int(os.environ.get("RANK", 0)) != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanochat.report", description="Build the training report card in $NANOCHAT_BASE_DIR/report/.")
    parser.add_argument("command", choices=["reset", "generate"],
                        help="reset: start a new report (clears old sections); generate: assemble report.md")
    parser.add_argument("--copy-to", default=None, help="also copy report.md here after generate (e.g. .)")
    args = parser.parse_args(argv)
    report = get_report()
    if args.command == "reset":
        path = report.reset()
        print(f"report reset; environment written to {path}")
    else:
        path = report.generate()
        print(f"report written to {path}")
        if args.copy_to:
            dest = shutil.copy(path, args.copy_to)
            # the report links its plots (PNGs beside report.md) by relative name: copy them along
            dest_dir = os.path.dirname(os.path.abspath(dest))
            if dest_dir != os.path.abspath(report.report_dir):
                for name in sorted(os.listdir(report.report_dir)):
                    if name.endswith(".png"):
                        shutil.copy(os.path.join(report.report_dir, name), dest_dir)
            print(f"copied to {dest}")


if __name__ == "__main__":
    from nanochat.common import run_main
    run_main(lambda: main(sys.argv[1:]))
