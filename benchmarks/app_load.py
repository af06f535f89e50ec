"""The search page under load: N headless-Chromium sessions upload a query at once against one real server.

    python -m benchmarks.app_load --index DIR --queries FOLDER [--model DIR] [--sessions 10] [--json OUT]

Starts `matsearch app` on a free port, warms it up with one session, then measures
  - one session alone: seconds from the upload to all k results drawn (median of --single runs),
  - --sessions sessions uploading together: the same, per session (the pages opened and drawn first),
  - CPU seconds used during the searches by the server, by the browsers and by the whole machine,
  - the server's resident memory (RSS of the streamlit process, from /proc): idle after the warm-up, peak under
    load, and --settle seconds after the sessions closed.
Needs playwright and Debian's /usr/bin/chromium. The browsers run on the same machine as the server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
K = 12  # the page's default number of results
UPLOADER = '[data-testid="stFileUploaderDropzoneInput"]'
DONE = """() => !document.querySelector('[data-testid="stStatusWidgetRunningIcon"]')
                && !document.querySelector('[data-testid="stStatusWidgetRunningManIcon"]')
                && !document.querySelector('[data-stale="true"]')"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """pid's child processes, theirs, and so on (not pid itself)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _tree_cpu_s(pids) -> dict[int, float]:
    """CPU seconds of each process still alive."""
    cpu = {}
    for pid in pids:
        try:
            cpu[pid] = _cpu_s(pid)
        except OSError:
            pass
    return cpu


def _machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (every core, /proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _streamlit_pid(launcher: int, deadline: float) -> int:
    """The streamlit server: the launcher's child process."""
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.2)
    raise RuntimeError("the launcher started no server")


def start_server(index: Path, port: int, log_path: Path, model: Path | str | None = None,
                 env: dict | None = None, cwd: Path = ROOT, timeout: float = 90) -> tuple[subprocess.Popen, int]:
    """`matsearch app` on 127.0.0.1:port in a process group of its own, once its health check answers: (the
    launcher process, the Streamlit server's pid). `env` defaults to this process's environment."""
    command = [sys.executable, "-m", "app.cli", "app", "--index", str(index), "--port", str(port),
               "--host", "127.0.0.1"]
    if model:
        command += ["--model", str(model)]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"the app did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.3)
    return process, _streamlit_pid(process.pid, deadline)


def stop_server(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


def _watch_script_runs(page) -> list[float]:
    """The times at which the server says a script run (or fragment run) finished, as its websocket message
    arrives in the browser: the server's part of a search is done then; what follows is the browser's."""
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    finished: list[float] = []

    def on_frame(payload) -> None:
        if isinstance(payload, bytes):
            msg = ForwardMsg.FromString(payload)
            if msg.WhichOneof("type") == "script_finished":
                finished.append(time.perf_counter())

    page.on("websocket", lambda ws: ws.on("framereceived", on_frame))
    return finished


async def _open(browser, url: str):
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    page.script_runs_finished = _watch_script_runs(page)
    await page.goto(url, timeout=180_000)
    await page.wait_for_selector(UPLOADER, state="attached", timeout=120_000)
    await page.wait_for_function(DONE, timeout=120_000)
    return page


async def _search(page, query: Path) -> float:
    """Seconds from the upload to k results drawn and the run finished; page.server_s: from the upload to the
    last script run's end arriving at the browser (the server's part)."""
    start = time.perf_counter()
    await page.set_input_files(UPLOADER, str(query))
    await page.locator('[class*="st-key-hit-0-"]').nth(K - 1).wait_for(timeout=180_000)
    await page.wait_for_function(DONE, timeout=180_000)
    end = time.perf_counter()
    runs = [t for t in page.script_runs_finished if start <= t <= end]
    page.server_s = (runs[-1] - start) if runs else float("nan")
    return end - start


def _browser_pids(server_pid: int) -> list[int]:
    """This process's descendants other than the server and its launcher: the Playwright driver and Chromium."""
    launcher = int(Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    server = {launcher, server_pid, *_descendants(server_pid)}
    return [pid for pid in _descendants(os.getpid()) if pid not in server]


async def _settled(server_pid: int, quiet: float = 0.05, timeout: float = 60.0) -> float:
    """Waits until the browsers have finished what the pages opened with (a chart's code is loaded and drawn
    after the script run has finished): their CPU use over half a second falls below `quiet` CPU-s. Returns
    the seconds waited."""
    start = time.perf_counter()
    before = _tree_cpu_s(_browser_pids(server_pid))
    while time.perf_counter() - start < timeout:
        await asyncio.sleep(0.5)
        now = _tree_cpu_s(_browser_pids(server_pid))
        if sum(t - before.get(pid, 0.0) for pid, t in now.items()) < quiet:
            break
        before = now
    return time.perf_counter() - start


async def measure(args, url: str, server_pid: int) -> dict:
    from playwright.async_api import async_playwright

    queries = sorted(p for p in Path(args.queries).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    queries = [q for q in queries if q.stat().st_size < 2 ** 20][: max(args.sessions, args.single) + 1]
    if len(queries) < args.sessions:
        raise SystemExit(f"{args.queries}: need {args.sessions} query images under 1 MB")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await _open(browser, url)  # warm-up: model, index and page code loaded
            await _search(page, queries[-1])
            await page.context.close()
            await asyncio.sleep(args.settle)
            idle = _rss_mb(server_pid)

            single, single_server = [], []
            cpu, search_cpu = _cpu_s(server_pid), {"server": 0.0, "browsers": 0.0}
            for i in range(args.single):
                page = await _open(browser, url)
                await _settled(server_pid)  # the search alone is measured, not the page still being drawn
                browsers, server = _tree_cpu_s(_browser_pids(server_pid)), _cpu_s(server_pid)
                single.append(await _search(page, queries[i]))
                single_server.append(page.server_s)
                search_cpu["server"] += (_cpu_s(server_pid) - server) / args.single
                search_cpu["browsers"] += sum(t - browsers.get(pid, 0.0) for pid, t in
                                              _tree_cpu_s(_browser_pids(server_pid)).items()) / args.single
                await page.context.close()
            single_cpu = (_cpu_s(server_pid) - cpu) / args.single

            peak = [idle]
            sampling = threading.Event()

            def sample():
                while not sampling.is_set():
                    peak[0] = max(peak[0], _rss_mb(server_pid))
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            pages = await asyncio.gather(*[_open(browser, url) for _ in range(args.sessions)])
            settle_open = await _settled(server_pid)
            sampler.start()
            load_before = _loadavg()
            browsers = _tree_cpu_s(_browser_pids(server_pid))
            started, cpu, machine = time.perf_counter(), _cpu_s(server_pid), _machine_busy_s()
            concurrent = await asyncio.gather(*[_search(pg, queries[i]) for i, pg in enumerate(pages)])
            wall, concurrent_cpu = time.perf_counter() - started, _cpu_s(server_pid) - cpu
            concurrent_server = [pg.server_s for pg in pages]
            machine = _machine_busy_s() - machine
            browsers_after = _tree_cpu_s(_browser_pids(server_pid))
            browser_cpu = sum(t - browsers.get(pid, 0.0) for pid, t in browsers_after.items())
            load_after = _loadavg()
            loaded = _rss_mb(server_pid)
            for pg in pages:
                await pg.context.close()
            await asyncio.sleep(args.settle)
            sampling.set()
            after = _rss_mb(server_pid)
        finally:
            await browser.close()
    one = statistics.median(single)
    return {"sessions": args.sessions, "single_s": single, "single_median_s": one,
            "concurrent_s": sorted(concurrent), "concurrent_wall_s": wall,
            # upload -> the server's last script-run end reaching the browser (before the browser has drawn it)
            "server_done_s": {"single": single_server, "concurrent": sorted(concurrent_server)},
            "worst_over_single": max(concurrent) / one,
            "server_cpu_s": {"per_single_session": single_cpu, "all_concurrent": concurrent_cpu},
            "single_search_cpu_s": search_cpu,  # one lone search (upload to results drawn), mean of the runs
            # during the concurrent searches: the browsers (Chromium and the Playwright driver) and everything on
            # the machine, to tell the server's share from the browsers' and other jobs'
            "concurrent_cpu_s": {"server": concurrent_cpu, "browsers": browser_cpu, "machine": machine,
                                 "machine_capacity": wall * len(os.sched_getaffinity(0))},
            "loadavg_1min": {"before_concurrent": load_before, "after_concurrent": load_after},
            "pages_settled_s": settle_open,  # waited after opening the sessions, before their uploads
            "rss_mb": {"idle": idle, "peak": peak[0], "after_load": loaded, "after_close": after},
            "settle_s": args.settle, "cpus": len(os.sched_getaffinity(0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--queries", required=True, type=Path, help="folder of query images (under 1 MB each)")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--single", type=int, default=3, help="lone-session runs (median)")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait before reading idle memory")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    port = _free_port()
    log_path = Path(args.json).with_suffix(".server.log") if args.json else Path(f"/tmp/app_load-{port}.log")
    process, pid = start_server(args.index, port, log_path, args.model)
    try:
        result = asyncio.run(measure(args, f"http://127.0.0.1:{port}", pid))
    finally:
        stop_server(process)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    rss = result["rss_mb"]
    print(f"one session: {result['single_median_s']:.2f} s (runs {', '.join(f'{s:.2f}' for s in result['single_s'])})")
    print(f"{result['sessions']} at once: " + ", ".join(f"{s:.2f}" for s in result["concurrent_s"])
          + f" s; worst {result['worst_over_single']:.1f}x one session")
    done = result["server_done_s"]
    print(f"server's part (upload -> run finished, at the browser): one session "
          f"{statistics.median(done['single']):.2f} s; {result['sessions']} at once "
          + ", ".join(f"{s:.2f}" for s in done["concurrent"]) + " s")
    cpu = result["server_cpu_s"]
    print(f"server CPU: {cpu['per_single_session']:.2f} s per lone session (open + search), "
          f"{cpu['all_concurrent']:.2f} s for the {result['sessions']} concurrent searches")
    c, one_cpu = result["concurrent_cpu_s"], result["single_search_cpu_s"]
    print(f"one lone search: server {one_cpu['server']:.2f} CPU-s, browsers {one_cpu['browsers']:.2f} CPU-s")
    print(f"during the concurrent searches: server {c['server']:.2f} CPU-s, browsers {c['browsers']:.2f} CPU-s, "
          f"whole machine {c['machine']:.2f} of {c['machine_capacity']:.2f} CPU-s; load average "
          f"{result['loadavg_1min']['before_concurrent']:.1f} -> {result['loadavg_1min']['after_concurrent']:.1f}")
    print(f"server RSS: idle {rss['idle']:.0f} MB, peak {rss['peak']:.0f} MB, {result['settle_s']:.0f} s after "
          f"closing {rss['after_close']:.0f} MB ({100 * (rss['after_close'] / rss['idle'] - 1):+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
