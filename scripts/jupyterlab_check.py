"""Open a stage notebook in a real JupyterLab, in headless Chromium, and run it as a person would.

  python scripts/jupyterlab_check.py [--screenshot /tmp/jupyterlab_check.png] [--keep]

Builds a throwaway copy of the project (dvc.yaml, tiny params, notebooks/01_prepare.ipynb) in a temporary
folder, starts JupyterLab there and opens the notebook, then checks that
  1. once the kernel is up the notebook is not marked unsaved, and neither autosave (set to 5 s) nor a save
     changes its md5 (the notebook is a DVC dependency of its stage);
  2. Run > Run All Cells runs every cell without an error, with the kernel started in notebooks/ as
     JupyterLab starts it, and writes the stage's metrics.
Saves a screenshot of the run notebook and exits non-zero on any failure. About two minutes on two cores.

Needs Debian's chromium and chromium-driver, and selenium in the virtualenv (not a project dependency):
  apt-get install -y --no-install-recommends chromium chromium-driver
  pip install selenium
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/01_prepare.ipynb"
METRICS = "reports/metrics/prepare.json"   # the notebook's default metrics_file
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
AUTOSAVE_SECONDS = 5   # JupyterLab's default is 120
INSTALL = ("needs Debian's chromium and chromium-driver, and selenium in this environment:\n"
           "  apt-get install -y --no-install-recommends chromium chromium-driver\n  pip install selenium")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def wait_for(what: str, ready, timeout: float, every: float = 0.5):
    """Poll `ready()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = ready()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def make_project(folder: Path) -> Path:
    """A project the notebook can run in with its default parameters: dvc.yaml (how the notebook finds the
    project root), the tiny params, and the notebook."""
    sys.path.insert(0, str(ROOT))
    from checks.tiny import tiny_params, write_tiny_text

    project = folder / "project"
    (project / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copy(ROOT / NOTEBOOK, project / NOTEBOOK)
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(write_tiny_text(folder / "text"))))
    return project


class JupyterLab:
    """A JupyterLab server on a free local port, with its own config, data and settings folders (the user's
    are neither read nor written). Runs in its own process group, so stopping it stops its kernels too."""

    def __init__(self, project: Path, home: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token = secrets.token_hex(16)
        self.log = home / "jupyterlab.log"
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
                   JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
        settings = {"apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                    "docmanager-extension/plugin": {"autosaveInterval": AUTOSAVE_SECONDS}}
        for plugin, values in settings.items():   # no news toast over the screenshot; autosave soon
            path = home / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        # `python -m jupyterlab` is the server itself; `jupyter lab` would run it as a child process.
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={project}"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_for("JupyterLab to answer", self._answers, timeout=120)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with status {self.process.returncode}; see {self.log} (--keep)")
        try:
            with urllib.request.urlopen(self.url("api/status"), timeout=5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Browser:
    """Headless Chromium on one notebook, driven through what a person uses: the toolbar and the menus."""

    def __init__(self, profile: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     f"--user-data-dir={profile}", "--window-size=1400,1800"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

    def js(self, script: str):
        return self.driver.execute_script(script)

    def kernel_status(self) -> str | None:
        return self.js("return document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status")

    def settle(self, seconds: float = 5, timeout: float = 120) -> None:
        """Wait until the kernel has been idle for `seconds` in a row: it reconnects once after starting."""
        end, idle_since = time.monotonic() + timeout, None
        while time.monotonic() < end:
            if self.kernel_status() != "idle":
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= seconds:
                return
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout:.0f} s for the kernel to settle")

    def unsaved(self) -> bool:
        return self.js("return document.querySelectorAll('.lm-DockPanel-tabBar .jp-mod-dirty').length > 0")

    def run_finished(self) -> bool:
        """Run All queues every cell ([*]); an error stops the run and leaves the cells after it unrun ([ ])."""
        prompts = self.js("return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
                          ".map(e => e.textContent.trim())")
        return self.kernel_status() == "idle" and prompts[0][1:-2].isdigit() and "[*]:" not in prompts

    def click(self, xpath: str) -> None:
        from selenium.webdriver.common.by import By

        wait_for(xpath, lambda: self.driver.find_elements(By.XPATH, xpath), timeout=30)[0].click()

    def save(self) -> None:
        self.click("//*[contains(@class, 'jp-NotebookPanel-toolbar')]//*[@data-command='docmanager:save']")

    def menu(self, menu: str, item: str) -> None:
        self.click(f"//li[contains(@class, 'lm-MenuBar-item')][normalize-space(.)='{menu}']")
        self.click(f"//li[contains(@class, 'lm-Menu-item')][.//div[contains(@class, 'lm-Menu-itemLabel')]"
                   f"[normalize-space(.)='{item}']]")


def saved(path: Path, since_ns: int) -> None:
    """Wait until the server has written `path` again (a save of unchanged content keeps its bytes)."""
    wait_for(f"JupyterLab to save {path.name}", lambda: path.stat().st_mtime_ns != since_ns, timeout=30)


def check(project: Path, lab: JupyterLab, browser: Browser, screenshot: Path) -> list[str]:
    """The checks of the module docstring; returns the failures."""
    failures = []
    notebook = project / NOTEBOOK
    before = md5(notebook)
    browser.driver.get(lab.url(f"lab/tree/{NOTEBOOK}"))
    browser.settle()
    # JupyterLab writes the kernel's metadata into the notebook as the kernel comes up; had that changed it,
    # autosave would have rewritten it by now.
    time.sleep(2 * AUTOSAVE_SECONDS)
    if md5(notebook) != before:
        failures.append(f"opening the notebook changed its md5 ({before} -> {md5(notebook)}): JupyterLab "
                        "changed its metadata and autosaved it")
    if browser.unsaved():
        failures.append("the opened notebook is marked unsaved")
    mtime = notebook.stat().st_mtime_ns
    browser.save()
    saved(notebook, mtime)
    if md5(notebook) != before:
        failures.append(f"saving the opened notebook changed its md5 ({before} -> {md5(notebook)})")

    browser.menu("Run", "Run All Cells")
    wait_for("the run to finish", browser.run_finished, timeout=600, every=1)
    mtime = notebook.stat().st_mtime_ns
    browser.save()   # the outputs, to read them exactly; this copy is thrown away
    saved(notebook, mtime)
    browser.driver.save_screenshot(str(screenshot))
    cells = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    for i, cell in enumerate(cells):
        if cell.execution_count is None:
            failures.append(f"code cell {i} did not run")
        for out in cell.outputs:
            if out.output_type == "error":
                failures.append(f"code cell {i} failed: {out.ename}: {out.evalue}")
            if "IProgress" in out.get("text", ""):
                failures.append(f"code cell {i} shows tqdm's IProgress warning")
    moved = f"working directory {project / 'notebooks'} -> {project} "
    if not any(moved in out.get("text", "") for cell in cells for out in cell.outputs):
        failures.append(f"setup did not say it moved from notebooks/ to the project root ({moved!r})")
    if not (project / METRICS).is_file():
        failures.append(f"the notebook did not write {METRICS}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, default=Path(tempfile.gettempdir()) / "jupyterlab_check.png")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project and JupyterLab's log")
    args = parser.parse_args()
    try:
        import selenium  # noqa: F401
    except ImportError:
        print(f"selenium is missing: {INSTALL}", file=sys.stderr)
        return 2
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        print(f"{CHROMIUM} or {CHROMEDRIVER} is missing: {INSTALL}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="fut-jupyterlab-"))
    lab = browser = None
    try:
        project = make_project(work)
        lab = JupyterLab(project, work / "jupyter")
        browser = Browser(work / "chromium")
        failures = check(project, lab, browser, args.screenshot.resolve())
    except Exception as e:   # a timeout or a missing element: report it like any other failure
        failures = [f"{type(e).__name__}: {e}"]
        if browser:
            browser.driver.save_screenshot(str(args.screenshot.resolve()))
    finally:
        if browser:
            browser.driver.quit()
        if lab:
            lab.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if args.keep:
        print(f"project and JupyterLab's log kept in {work}")
    print(f"{'failed' if failures else 'passed'}; screenshot: {args.screenshot.resolve()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
