"""Timing, the copy-bandwidth yardstick, the report (text, Markdown, plot) and the command
`python -m benchmarks.harness` (run from the repository's root).

Timing (`time_call`): one warm-up call, then repetitions of `number` back-to-back calls, where
`number` makes a repetition last about min_time / repeat (1 for slow calls). Repetitions go on
until there are at least `repeat` of them and min_time has passed. The time reported is the best
repetition (the minimum over repetitions of the mean time per call); the median over repetitions
is kept too. The minimum is the least disturbed by other work on the machine. The
implementations of one cell are timed interleaved, in ROUNDS rounds (`_run_case`), so that a
burst of other work falls on all of them.

Throughput: GB/s of useful traffic = cases.traffic_bytes(...) / time (see benchmarks.harness.cases
for what counts). The yardstick is a parallel copy measured in the same run at the same thread
count (normcore._kernels.bandwidth.copy, float32 arrays of --copy-mib MiB, best of several): a
copy of n bytes moves 2n bytes, so "of copy" = GB/s / copy GB/s says how close a layer comes to
what the memory system gives. Ratios are other time / normcore time: above 1 normcore is faster.
"""
import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import normcore as nc
from . import cases as cases_mod
from . import peers

__all__ = [
    "Timing",
    "Result",
    "Report",
    "time_call",
    "copy_bandwidth",
    "all_cores",
    "default_threads",
    "machine_info",
    "Progress",
    "run",
    "format_time",
    "table",
    "header_lines",
    "text_report",
    "markdown_report",
    "plot_report",
    "require_matplotlib",
    "add_arguments",
    "argument_parser",
    "main",
]

FULL = {"min_time": 0.5, "repeat": 5, "copy_mib": 256, "copy_repeat": 10}
QUICK = {"min_time": 0.1, "repeat": 3, "copy_mib": 64, "copy_repeat": 5}
PLOT_INSTALL = 'pip install matplotlib (the "plot" extra of normcore-nn)'


# -- timing ----------------------------------------------------------------------------------

@dataclass
class Timing:
    best: float     # seconds per call: the best repetition's mean
    median: float   # seconds per call: the median repetition's mean
    reps: int       # repetitions
    number: int     # calls per repetition


ROUNDS = 3  # rounds over a cell's implementations


def time_call(fn, min_time=FULL["min_time"], repeat=FULL["repeat"]):
    """Time fn() as the module docstring says; returns a Timing."""
    start = time.perf_counter()
    fn()  # warm-up: first-call costs (allocations, thread team, lazy init)
    first = time.perf_counter() - start
    target = max(0.0, min_time) / max(1, repeat)
    number = max(1, int(target / first)) if first > 0 else 1
    per_call = []
    began = time.perf_counter()
    while len(per_call) < max(1, repeat) or time.perf_counter() - began < min_time:
        t = time.perf_counter()
        for _ in range(number):
            fn()
        per_call.append((time.perf_counter() - t) / number)
    return Timing(min(per_call), statistics.median(per_call), len(per_call), number)


def copy_bandwidth(threads, mib=FULL["copy_mib"], repeat=FULL["copy_repeat"]):
    """GB/s of a parallel copy of `mib` MiB of float32 with `threads` threads (2 bytes moved per
    byte copied), best of `repeat`; None when the bandwidth kernel is not built."""
    try:
        from normcore._kernels import bandwidth
    except ImportError:
        return None
    n = max(1, int(mib * 2 ** 20) // 4)
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)  # written once, so its pages exist before the timing
    bandwidth.copy(src, dst, threads)
    best = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        bandwidth.copy(src, dst, threads)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def all_cores():
    """The cores this process may run on (os.sched_getaffinity where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads():
    """1 and all cores."""
    return sorted({1, all_cores()})


# -- the machine -----------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info():
    """What the header of a report says about the machine and the software."""
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "usable cores": all_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "openmp": nc.openmp_enabled(),
        "versions": peers.versions(),
    }


# -- running ---------------------------------------------------------------------------------

@dataclass
class Result:
    case: cases_mod.Case
    threads: int
    impl: str
    timing: Timing = None
    status: str = "ok"  # ok, unsupported, unavailable, error
    message: str = ""

    def gbps(self, itemsize=4):
        if self.timing is None:
            return None
        return self.case.traffic_bytes(itemsize) / self.timing.best / 1e9


@dataclass
class Report:
    impls: list
    threads: list
    results: list = field(default_factory=list)
    bandwidth: dict = field(default_factory=dict)  # threads -> copy GB/s (None: not measured)
    machine: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def get(self, case, threads, impl):
        for r in self.results:
            if r.case == case and r.threads == threads and r.impl == impl:
                return r
        return None

    def layers(self):
        seen = []
        for r in self.results:
            if r.case.layer not in seen:
                seen.append(r.case.layer)
        return seen


class Progress:
    """`[#####.....] 12/48 label` on one line of stderr, redrawn in place; silent unless stderr
    is a terminal."""

    def __init__(self, total, stream=None, enabled=None, width=20):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = (hasattr(self.stream, "isatty") and self.stream.isatty()) if enabled is None else enabled
        self.total, self.width, self._shown = max(1, total), width, 0

    def update(self, done, label=""):
        if not self.enabled:
            return
        filled = self.width * done // self.total
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {label}"
        pad = max(0, self._shown - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._shown = len(line)

    def close(self):
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()


def run(case_list, impls, threads, min_time=FULL["min_time"], repeat=FULL["repeat"], copy_mib=FULL["copy_mib"],
        copy_repeat=FULL["copy_repeat"], progress=None, seed=0):
    """Time every case with every implementation at every thread count; returns a Report.
    An implementation that is not installed, or does not do a mode, gets a Result without a
    timing; one that raises gets status 'error' (the run goes on)."""
    report = Report(list(impls), list(threads), machine=machine_info(),
                    settings={"min_time": min_time, "repeat": repeat, "copy_mib": copy_mib})
    progress = Progress(len(case_list) * len(impls) * len(threads)) if progress is None else progress
    done = 0
    for n in threads:
        with peers.set_threads(n):
            progress.update(done, f"copy bandwidth, threads={n}")
            report.bandwidth[n] = copy_bandwidth(n, copy_mib, copy_repeat)
            shared = {}  # inputs of one layer and shape, drawn once for all its modes and implementations
            for case in case_list:
                if shared.get("key") != (case.layer, case.shape):
                    shared = {"key": (case.layer, case.shape)}
                progress.update(done, f"{case} threads={n}")
                report.results.extend(_run_case(case, n, impls, min_time, repeat, seed, shared))
                done += len(impls)
    progress.update(done, "done")
    progress.close()
    return report


def _run_case(case, threads, impls, min_time, repeat, seed, shared):
    """One cell, every implementation, interleaved: ROUNDS rounds, each timing every
    implementation in turn for its share of min_time and repeat; each keeps its best. A burst
    of other work on a shared machine then falls on all of them rather than on one."""
    results, fns = [], {}
    for impl in impls:
        result = Result(case, threads, impl)
        results.append(result)
        if not peers.supports(impl, case.layer, case.mode):
            result.status = "unsupported"
            continue
        reason = peers.unavailable_reason(impl)
        if reason is not None:
            result.status, result.message = "unavailable", reason
            continue
        try:
            if "inputs" not in shared:
                shared["inputs"] = peers.make_inputs(case.layer, case.shape, np.float32, np.random.default_rng(seed))
            fns[impl] = (result, peers.make(impl, case.layer, case.mode, case.shape, np.float32,
                                            inputs=shared["inputs"]))
        except Exception as exc:  # noqa: BLE001 - report it in the table, keep benchmarking the rest
            result.status, result.message = "error", f"{type(exc).__name__}: {exc}"
    for _ in range(ROUNDS):
        for result, fn in fns.values():
            if result.status != "ok":
                continue
            try:
                t = time_call(fn, min_time / ROUNDS, -(-repeat // ROUNDS))
            except Exception as exc:  # noqa: BLE001
                result.status, result.message = "error", f"{type(exc).__name__}: {exc}"
                result.timing = None
                continue
            result.timing = t if result.timing is None else _better(result.timing, t)
    return results


def _better(a, b):
    """Two rounds of one implementation as one Timing: the best of both, the lower of their
    medians (the least disturbed round), their repetitions added."""
    return Timing(min(a.best, b.best), min(a.median, b.median), a.reps + b.reps, a.number)


# -- the report ------------------------------------------------------------------------------

def format_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 10:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _number(x):
    """1 decimal from 1 up, 2 significant digits below (0.031, not 0.0)."""
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _percent(x):
    return f"{x:.0f}%" if x >= 10 else _number(x) + "%"


_CELL = {"unsupported": "-", "unavailable": "n/a", "error": "error"}


def table(report, layer):
    """(headers, rows) of the table for `layer`: one row per shape, mode and thread count."""
    others = [impl for impl in report.impls if impl != "normcore"]
    has_nc = "normcore" in report.impls
    headers = ["shape", "mode", "threads", *report.impls]
    if has_nc:
        headers += ["GB/s", "of copy", *(f"vs {impl}" for impl in others)]
    layer_cases = []
    for r in report.results:
        if r.case.layer == layer and r.case not in layer_cases:
            layer_cases.append(r.case)
    rows = []
    for case in layer_cases:
        for n in report.threads:
            got = {impl: report.get(case, n, impl) for impl in report.impls}
            row = [case.shape_str, case.mode, str(n)]
            for impl in report.impls:
                r = got[impl]
                row.append(format_time(r.timing.best) if r is not None and r.timing else _CELL.get(getattr(r, "status", ""), "-"))
            if has_nc:
                mine = got["normcore"]
                t_nc = mine.timing.best if mine is not None and mine.timing else None
                gbps = mine.gbps() if t_nc else None
                copy = report.bandwidth.get(n)
                row.append(_number(gbps) if gbps else "-")
                row.append(_percent(100 * gbps / copy) if gbps and copy else "-")
                for impl in others:
                    r = got[impl]
                    row.append(f"{r.timing.best / t_nc:.2f}x" if t_nc and r is not None and r.timing else "-")
            rows.append(row)
    return headers, rows


def _text_table(headers, rows):
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    left = {"shape", "mode"}

    def line(cells):
        return "  ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, headers))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _markdown_table(headers, rows):
    align = ["---" if h in ("shape", "mode") else "---:" for h in headers]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def header_lines(report):
    m = report.machine
    v = m.get("versions", {})
    bw = "; ".join(f"{n} thread{'s' if n > 1 else ''}: " + (f"{g:.1f} GB/s" if g else "n/a")
                   for n, g in report.bandwidth.items())
    s = report.settings
    return [
        f"date: {m.get('date')}",
        f"CPU: {m.get('cpu')}; {m.get('cores')} cores ({m.get('usable cores')} usable); {m.get('platform')}",
        (f"Python {m.get('python')}; normcore {v.get('normcore')} (OpenMP {'on' if m.get('openmp') else 'off'}); "
         f"numpy {v.get('numpy')}; torch {v.get('torch')}; onnxruntime {v.get('onnxruntime')}; onnx {v.get('onnx')}"),
        f"copy bandwidth ({s.get('copy_mib')} MiB float32, 2 bytes moved per byte copied): {bw}",
        (f"timing: best of >= {s.get('repeat')} repetitions over >= {s.get('min_time')} s per cell; "
         "GB/s = useful traffic of normcore / time; vs X = X's time / normcore's (> 1: normcore faster); "
         "'-' not done by that implementation, 'n/a' not installed"),
    ]


def _problems(report):
    return [f"{r.impl} {r.case} threads={r.threads}: {r.message}" for r in report.results if r.status == "error"]


def text_report(report):
    out = ["normcore benchmarks", *header_lines(report)]
    for layer in report.layers():
        headers, rows = table(report, layer)
        out += ["", f"== {layer} ==", _text_table(headers, rows)]
    unavailable = sorted({r.message for r in report.results if r.status == "unavailable"})
    problems = _problems(report)
    if unavailable or problems:
        out.append("")
        out += [f"not installed: {msg}" for msg in unavailable]
        out += [f"error: {p}" for p in problems]
    return "\n".join(out) + "\n"


def markdown_report(report, command, plot_path=None, markdown_path=None):
    out = [
        "# normcore benchmarks",
        "",
        "Generated by normcore's benchmark command; regenerate with",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
        *(f"- {line}" for line in header_lines(report)),
        "",
        ("Useful traffic (the bytes GB/s counts), per call, with B = the size of x: 2 B for a forward "
         "that can fuse statistics and apply (instance, group, layer and local response norm, "
         "batch_norm and switchable_norm eval), 3 B for a batch_norm or switchable_norm training "
         "forward, and for fwd+bwd the training forward plus 3 B (5 B for batch_norm and "
         "switchable_norm) for the backward."),
    ]
    for layer in report.layers():
        headers, rows = table(report, layer)
        out += ["", f"## {layer}", "", _markdown_table(headers, rows)]
    if plot_path:
        base = os.path.dirname(os.path.abspath(markdown_path)) if markdown_path else os.getcwd()
        rel = os.path.relpath(os.path.abspath(plot_path), base).replace(os.sep, "/")
        out += ["", "## Throughput against tensor size", "", f"![throughput against tensor size]({rel})"]
    problems = _problems(report)
    if problems:
        out += ["", "## Errors", "", *(f"- {p}" for p in problems)]
    return "\n".join(out) + "\n"


def require_matplotlib():
    """matplotlib.pyplot with the Agg backend, or SystemExit naming what to install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report, path):
    """Throughput (GB/s of useful traffic) against the size of x, one panel per layer and thread
    count: colour = implementation, marker and line style = mode, open markers = transformer
    rows, the copy bandwidth as a horizontal line; one legend per layer, right of its row."""
    plt = require_matplotlib()
    from matplotlib.lines import Line2D

    layers = report.layers()
    rows, cols = max(1, len(layers)), max(1, len(report.threads))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols + 2.2, 3.4 * rows), squeeze=False,
                             layout="constrained")
    colors = {impl: f"C{i}" for i, impl in enumerate(peers.IMPLS)}
    markers = {"train": "o", "eval": "s", "forward": "^", "fwd+bwd": "D"}
    styles = {"train": "-", "eval": "--", "forward": "-", "fwd+bwd": ":"}
    for i, layer in enumerate(layers):
        drawn_impls, drawn_rows = [], False
        for j, n in enumerate(report.threads):
            ax = axes[i][j]
            for impl in report.impls:
                for mode in cases_mod.modes_for(layer):
                    for rows_kind in (False, True):  # (N, C, H, W) and (tokens, features): separate lines
                        points = sorted((r.case.nbytes(), r.gbps()) for r in report.results
                                        if r.case.layer == layer and r.case.mode == mode and r.threads == n
                                        and r.impl == impl and r.timing is not None
                                        and (len(r.case.shape) == 2) == rows_kind)
                        if not points:
                            continue
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, color=colors[impl], marker=markers[mode], linestyle=styles[mode],
                                markersize=4, markerfacecolor="white" if rows_kind else colors[impl])
                        drawn_rows |= rows_kind
                        if impl not in drawn_impls:
                            drawn_impls.append(impl)
            copy = report.bandwidth.get(n)
            if copy:
                ax.axhline(copy, color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log")
            ax.set_title(f"{layer}, {n} thread{'s' if n > 1 else ''}", fontsize=10)
            ax.set_xlabel("size of x (bytes)")
            ax.set_ylabel("GB/s of useful traffic")
            ax.grid(True, which="both", alpha=0.3)
        handles = [Line2D([], [], color=colors[impl], label=impl) for impl in drawn_impls]
        handles += [Line2D([], [], color="black", marker=markers[mode], linestyle=styles[mode], markersize=4,
                           label=mode) for mode in cases_mod.modes_for(layer)]
        if drawn_rows:
            handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="white", linestyle="none",
                                  markersize=4, label="rows (tokens, features)"))
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1, label="copy bandwidth"))
        axes[i][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                           borderaxespad=0)
    fig.suptitle(f"normcore benchmarks: {report.machine.get('cpu', '')}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command -----------------------------------------------------------------------------

def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the thread count must be at least 1, got {n}")
    return n


def _non_negative_float(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return x


COMMAND = "python -m benchmarks.harness"


def add_arguments(parser):
    """The options of `python -m benchmarks.harness`."""
    parser.add_argument("--threads", type=_positive_int, nargs="+", action="extend", metavar="N",
                        help=f"thread counts to run at (repeatable; default: 1 and all cores, "
                             f"here {' '.join(map(str, default_threads()))})")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset of shapes (" + ", ".join(cases_mod.QUICK_SHAPES) + ") and a shorter "
                             "time budget")
    parser.add_argument("--layers", nargs="+", choices=cases_mod.LAYERS, metavar="LAYER",
                        help="layers to run (default: all): " + ", ".join(cases_mod.LAYERS))
    parser.add_argument("--impls", nargs="+", choices=peers.IMPLS, metavar="IMPL",
                        help="implementations to compare (default: all; missing ones are shown as n/a): "
                             + ", ".join(peers.IMPLS))
    parser.add_argument("--plot", metavar="FILE.png", help="draw GB/s against tensor size to this image "
                        "(needs matplotlib: " + PLOT_INSTALL + ")")
    parser.add_argument("--markdown", metavar="FILE.md", help="also write the report as Markdown (BENCHMARKS.md)")
    parser.add_argument("--min-time", type=_non_negative_float, metavar="SECONDS",
                        help=f"least time spent timing each cell (default {FULL['min_time']}, "
                             f"--quick {QUICK['min_time']})")
    parser.add_argument("--repeat", type=_positive_int, metavar="N",
                        help=f"least number of timed repetitions per cell (default {FULL['repeat']}, "
                             f"--quick {QUICK['repeat']})")
    parser.add_argument("--copy-mib", type=_positive_int, metavar="MIB",
                        help=f"size of the arrays of the copy-bandwidth yardstick (default {FULL['copy_mib']}, "
                             f"--quick {QUICK['copy_mib']})")
    return parser


def argument_parser():
    """The command's argument parser."""
    return add_arguments(argparse.ArgumentParser(
        prog=COMMAND,
        description="Time normcore's layers next to PyTorch, ONNX Runtime and plain NumPy (those "
                    "installed) and print GB/s of useful memory traffic against a parallel copy's. "
                    "Run from the repository's root; see benchmarks/harness for what is measured."))


def main(argv=None):
    """Run the command on `argv` (default: sys.argv[1:]), which the Markdown also echoes as the
    command that regenerates it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = argument_parser().parse_args(argv)
    if args.plot:
        require_matplotlib()  # fail now, not after the benchmarks
    budget = QUICK if args.quick else FULL
    min_time = budget["min_time"] if args.min_time is None else args.min_time
    repeat = budget["repeat"] if args.repeat is None else args.repeat
    copy_mib = budget["copy_mib"] if args.copy_mib is None else args.copy_mib
    threads = sorted(set(args.threads)) if args.threads else default_threads()
    impls = [impl for impl in peers.IMPLS if impl in (args.impls or peers.IMPLS)]  # always in IMPLS order
    layers = list(dict.fromkeys(args.layers or cases_mod.LAYERS))
    case_list = cases_mod.all_cases(quick=args.quick, layers=layers)
    report = run(case_list, impls, threads, min_time=min_time, repeat=repeat, copy_mib=copy_mib,
                 copy_repeat=budget["copy_repeat"])
    sys.stdout.write(text_report(report))
    sys.stdout.flush()
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}")
    if args.markdown:
        command = f"{COMMAND} {shlex.join(argv)}".rstrip()
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown_report(report, command, args.plot, args.markdown))
        print(f"Markdown written to {args.markdown}")
    return 1 if _problems(report) else 0
